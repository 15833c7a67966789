from pathlib import Path

import pytest

from models.cache import source_stamp


def test_a_source_reached_through_a_link_has_the_stamp_of_the_file_itself(tmp_path: Path) -> None:
    real = tmp_path / "venv" / "model.onnx"
    real.parent.mkdir()
    real.write_bytes(b"weights")
    (tmp_path / "checkout").mkdir()
    (tmp_path / "checkout" / ".venv").symlink_to(real.parent)
    linked = tmp_path / "checkout" / ".venv" / "model.onnx"
    assert source_stamp([linked], 3) == source_stamp([real], 3)
    assert list(source_stamp([linked], 3)["sources"]) == ["model.onnx"]


def test_two_sources_of_one_name_are_refused(tmp_path: Path) -> None:
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "model.onnx").write_bytes(folder.encode())
    with pytest.raises(ValueError, match="two sources named model.onnx"):
        source_stamp([tmp_path / "a" / "model.onnx", tmp_path / "b" / "model.onnx"], 1)
