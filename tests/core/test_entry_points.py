import sys
from importlib import metadata
from pathlib import Path

import pytest

from core import registry


@pytest.mark.parametrize("group", [registry.GROUP, registry.FACE_GROUP])
def test_the_entry_points_are_those_importlib_metadata_finds(group: str) -> None:
    assert sorted(registry.entry_points(group)) == sorted((e.name, e.value) for e in metadata.entry_points(group=group))
    assert registry.entry_points(group)


def test_the_first_distribution_of_a_name_on_the_path_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for folder, value in (("first", "one.module:UNIT [extra]"), ("second", "two.module:UNIT")):
        info = tmp_path / folder / "Some.Package-1.0.dist-info"
        info.mkdir(parents=True)
        (info / "entry_points.txt").write_text(f"[other]\nx = y:z\n\n[unitbus.test]\nthing = {value}\n")
    monkeypatch.setattr(sys, "path", [str(tmp_path / "first"), str(tmp_path / "absent"), str(tmp_path / "second")])
    assert registry.entry_points("unitbus.test") == [("thing", "one.module:UNIT")]
    assert registry.load_entry_point("core.registry:UnitInfo.types") is registry.UnitInfo.types
