"""work_ids on other boards and what sys hands to the fleet bridge (protocol.md §21.1, §21.4)."""
from __future__ import annotations

import pytest

from core.envelope import Request
from core.ids import WorkId, is_task_ref, on_board, split_board
from core.sys.fleet import remote_inputs, remote_source, wants_fleet


@pytest.mark.parametrize("text, expected", [
    ("llm@kitchen", ("llm", "kitchen")),
    ("llm.1003@kitchen", ("llm.1003", "kitchen")),
    ("sys@Hub_2-b", ("sys", "Hub_2-b")),
    ("llm@*", ("llm", "*")),
    ("llm", ("llm", None)),
    ("llm.1003", ("llm.1003", None)),
    ("llm@", ("llm@", "")),
    ("llm@two words", ("llm@two words", "")),
    ("llm@a.b", ("llm@a.b", "")),
    ("llm@" + "x" * 65, ("llm@" + "x" * 65, "")),
])
def test_split_board(text, expected):
    assert split_board(text) == expected


def test_local_work_ids_stay_local_and_remote_ones_do_not_parse_as_local():
    assert WorkId.parse("llm@kitchen") is None  # never mistaken for a unit of this board
    assert on_board("llm.1003", "kitchen") == "llm.1003@kitchen"
    assert on_board("", "kitchen") == "sys@kitchen"


@pytest.mark.parametrize("work_id, action, data, expected", [
    ("llm@kitchen", "setup", {}, True),
    ("llm.1003@kitchen", "inference", "hi", True),
    ("llm@bad name", "setup", {}, True),  # the bridge answers it with the reason
    ("sys", "lstask", {"fleet": True}, True),
    ("sys", "hwinfo", {"fleet": True}, True),
    ("sys", "lstask", {"fleet": False}, False),
    ("sys", "lstask", "None", False),
    ("sys", "ping", {"fleet": True}, False),
    ("llm", "setup", {"fleet": True}, False),
    ("llm.1003", "inference", "a@b", False),
])
def test_wants_fleet(work_id, action, data, expected):
    assert wants_fleet(Request("1", work_id, action, data=data)) is expected


@pytest.mark.parametrize("text, task, remote", [
    ("asr.1001", True, False), ("asr.1001@mic", True, True), ("sys.pcm@mic", False, True),
    ("sys.pcm", False, False), ("asr.1001@*", False, False), ("asr.1001@", False, False),
    ("asr@mic", False, False), ("llm.utf-8@mic", False, False),
])
def test_link_sources_here_and_on_boards(text, task, remote):
    """§21.8: what `input` and `link` may name, and which of those the fleet bridge imports first."""
    assert is_task_ref(text) is task
    assert remote_source(text) is remote


def test_remote_inputs_of_setup_and_link():
    setup = Request("s", "llm", "setup", data={"model": "m", "input": ["llm.utf-8", "asr.1001@mic", "kws.1000"]})
    assert remote_inputs(setup) == ["asr.1001@mic"]
    assert remote_inputs(Request("s", "kws", "setup", data={"input": "sys.pcm@mic"})) == ["sys.pcm@mic"]
    assert remote_inputs(Request("l", "llm.1002", "link", data="asr.1001@mic")) == ["asr.1001@mic"]
    assert remote_inputs(Request("l", "llm.1002", "link", data={"bad": 1})) == []
    assert remote_inputs(Request("i", "llm.1002", "inference", data="asr.1001@mic")) == []
    assert remote_inputs(Request("s", "llm", "setup", data={"input": 5})) == []
