"""Settings precedence (spec §20) and manifests: search order, aliases, merge (spec §17)."""
from __future__ import annotations

import json

import pytest

from core.errors import ErrorCode, UnitError
from core.ids import ObjectType, WorkId
from core.manifest import ManifestStore, merge_params, validate, ManifestError
from core.settings import Settings, SettingsError


def test_precedence_defaults_file_env_cli(tmp_path):
    config = tmp_path / "u.toml"
    config.write_text("[tcp]\nport = 2000\nbind = '0.0.0.0'\n[sys]\nallow = ['bashexec']\n")
    s = Settings.load(config, environ={})
    assert (s["tcp.port"], s["tcp.bind"], s["sys.allow"], s["llm.max_tasks"]) == (2000, "0.0.0.0", ["bashexec"], 2)
    s = Settings.load(config, environ={"UNITBUS_TCP_PORT": "3000"})
    assert s["tcp.port"] == 3000
    s = Settings.load(config, ["tcp.port=4000", "framing.escape_braces=true"], environ={"UNITBUS_TCP_PORT": "3000"})
    assert s["tcp.port"] == 4000 and s["framing.escape_braces"] == "true"
    with pytest.raises(SettingsError):
        Settings.load(config, ["tcp.port=many"], environ={})
    with pytest.raises(SettingsError):
        Settings.load(config, ["nonsense"], environ={})


def test_an_unknown_key_is_an_error_that_names_it(tmp_path):
    config = tmp_path / "u.toml"
    config.write_text("[tcp]\nprot = 2000\n")
    with pytest.raises(SettingsError, match=r"u.toml: unknown setting tcp.prot \(did you mean tcp.port\?\)"):
        Settings.load(config, environ={})
    with pytest.raises(SettingsError, match="command line: unknown setting nothing.like.this$"):
        Settings.load(None, ["nothing.like.this=1"], environ={"UNITBUS_CONFIG": str(tmp_path / "absent.toml")})
    # Each installed unit declares its settings section, its task limit included.
    assert Settings.load(None, ["skel.max_tasks=4"], environ={"UNITBUS_CONFIG": str(tmp_path / "absent.toml")})["skel.max_tasks"] == 4


def test_a_units_typed_section_is_composed_and_read_back_typed(tmp_path):
    from dataclasses import dataclass

    from units.audio import AudioSettings

    from core.settings import section_defaults

    config = tmp_path / "u.toml"
    config.write_text("[audio]\nperiod_ms = 20\nloop = true\n")
    settings = Settings.load(config, ["audio.capture=push"], environ={})
    assert settings.section("audio", AudioSettings) == AudioSettings(period_ms=20, loop=True, capture="push")
    config.write_text("[audio]\nperiod = 20\n")
    with pytest.raises(SettingsError, match=r"unknown setting audio.period \(did you mean audio.period_ms\?\)"):
        Settings.load(config, environ={})
    with pytest.raises(SettingsError, match="audio.period_ms: expected an integer"):
        Settings.load(None, ["audio.period_ms=often"], environ={"UNITBUS_CONFIG": str(tmp_path / "absent.toml")})

    @dataclass
    class NoDefault:
        level: int

    with pytest.raises(SettingsError, match="x.level: a setting needs a default"):
        section_defaults("x", NoDefault)
    with pytest.raises(SettingsError, match="not a dataclass"):
        section_defaults("x", dict)


def test_bad_toml_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[tcp\nport=")
    with pytest.raises(SettingsError, match="bad.toml"):
        Settings.load(bad, environ={})


MANIFEST = {"mode": "tiny-llm", "type": "llm", "capabilities": ["chat"], "input_type": ["llm.utf-8"],
            "output_type": ["llm.utf-8"], "aliases": ["qwen2.5-0.5B-prefill-20e"],
            "mode_param": {"max_token_len": 128, "temperature": 0.7, "gguf": "x.gguf"}}


def store(tmp_path, **manifests) -> ManifestStore:
    bundled = tmp_path / "bundled"
    bundled.mkdir(exist_ok=True)
    for name, body in manifests.items():
        (bundled / f"mode_{name}.json").write_text(json.dumps(body))
    return ManifestStore({"models.data_dir": str(tmp_path / "data"), "models.manifest_dir": str(tmp_path / "mdir"),
                          "models.etc_dir": str(tmp_path / "etc"), "models.share_dir": str(tmp_path / "share")},
                         cwd=tmp_path / "cwd", bundled=bundled)


def test_resolve_exact_alias_and_normalised(tmp_path):
    s = store(tmp_path, **{"tiny-llm": MANIFEST})
    assert s.resolve("tiny-llm", "llm")[0].mode == "tiny-llm"
    manifest, note = s.resolve("qwen2.5-0.5B-prefill-20e", "llm")
    assert note == "model alias: qwen2.5-0.5B-prefill-20e -> tiny-llm"
    assert s.resolve("TINY_LLM", "llm")[0].mode == "tiny-llm"
    with pytest.raises(UnitError) as info:
        s.resolve("tiny-llm", "tts")  # wrong type is not a match
    assert info.value.code == ErrorCode.MODEL_LOADING and "see sys.lsmode" in info.value.message


def test_search_order_prefers_earlier_roots(tmp_path):
    s = store(tmp_path, **{"tiny-llm": MANIFEST})
    (tmp_path / "mdir").mkdir()
    override = dict(MANIFEST, mode_param={"max_token_len": 7})
    (tmp_path / "mdir" / "mode_tiny-llm.json").write_text(json.dumps(override))
    assert s.resolve("tiny-llm", "llm")[0].params == {"max_token_len": 7}
    (tmp_path / "cwd").mkdir()
    (tmp_path / "cwd" / "tiny-llm.json").write_text(json.dumps(dict(MANIFEST, mode_param={"max_token_len": 9})))
    assert s.resolve("tiny-llm", "llm")[0].params == {"max_token_len": 9}
    assert [m.params for m in s.all()] == [{"max_token_len": 7}]  # lsmode: manifest dir hides the bundled one


def test_invalid_manifests_are_skipped_not_fatal(tmp_path):
    s = store(tmp_path, good=MANIFEST, bad={"mode": "bad"})
    (tmp_path / "bundled" / "mode_junk.json").write_text("{not json")
    assert [m.mode for m in s.all()] == ["tiny-llm"]
    with pytest.raises(ManifestError):
        validate({**MANIFEST, "type": "toaster"})


def test_setup_overrides_manifest_overrides_default():
    merged = merge_params({"max_token_len": 127, "prompt": ""}, {"max_token_len": 1024, "temperature": 0.7},
                          {"max_token_len": 2.0, "temperature": 1, "unknown": 5})
    assert merged == {"max_token_len": 2, "temperature": 1.0, "prompt": ""}
    for bad in ({"max_token_len": 2.5}, {"max_token_len": True}, {"prompt": 3}):
        with pytest.raises(UnitError) as info:
            merge_params({"max_token_len": 127, "prompt": ""}, {}, bad)
        assert info.value.code == ErrorCode.JSON_FORMAT and "expected" in info.value.message


def test_work_ids_and_object_types_parse_exactly():
    assert WorkId.parse("llm.1002") == WorkId("llm", 1002)
    assert WorkId.parse("") == WorkId("sys") == WorkId.parse("sys.whatever")
    assert WorkId.parse("mysys") == WorkId("mysys")  # no substring matching
    assert WorkId.parse("LLM") is None and WorkId.parse("llm.x") is None
    t = ObjectType.parse("asr.wav.stream.base64")
    assert t.stream and t.base64 and t.has("wav") and not ObjectType.parse("llm.streaming").stream


def test_faces_declare_their_sections_and_core_keeps_only_its_own(tmp_path):
    from firmware_bridge import TcpSettings
    from firmware_bridge.http import OpenAISettings

    from core import registry
    from core.registry import FaceInfo
    from core.settings import DEFAULTS

    assert {"bridge", "http", "wyoming", "fleet"} <= set(registry.faces())
    assert not [key for key in DEFAULTS if key.split(".")[0] in ("tcp", "uart", "http", "wyoming", "fleet")]
    config = tmp_path / "u.toml"
    config.write_text("[tcp]\nport = 2000\n[http.openai]\nport = 9000\n")
    settings = Settings.load(config, ["http.openai.enabled=false"], environ={})
    assert settings.section("tcp", TcpSettings) == TcpSettings(port=2000)
    assert settings.section("http.openai", OpenAISettings) == OpenAISettings(port=9000, enabled=False)
    config.write_text("[http.openai]\nprot = 9000\n")
    with pytest.raises(SettingsError, match=r"unknown setting http.openai.prot \(did you mean http.openai.port\?\)"):
        Settings.load(config, environ={})

    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Stolen:
        endpoint: str = "tcp://elsewhere"

    with pytest.raises(SettingsError, match="bus.endpoint: core's own setting"):
        registry.face_sections(FaceInfo("thief", "thief", settings={"bus": Stolen}))


def test_up_starts_the_faces_their_settings_ask_for(tmp_path):
    from core.supervisor import plan

    def planned(*overrides: str) -> list[tuple[str, str]]:
        settings = Settings.load(None, ["up.units=[\"skel\"]", *overrides],
                                 environ={"UNITBUS_CONFIG": str(tmp_path / "absent.toml")})
        return [(child.name, child.module) for child in plan(settings)]

    assert planned() == [("sys", "core.sys"), ("bridge", "firmware_bridge"), ("http", "firmware_bridge.http"),
                         ("wyoming", "firmware_bridge.wyoming"), ("skel", "units.skel")]
    assert [name for name, _ in planned("up.http=false", "up.wyoming=false")] == ["sys", "bridge", "skel"]
    # The fleet starts when it is given a NATS server, with one of its own when it serves one.
    assert [name for name, _ in planned("up.http=false", "up.wyoming=false", "fleet.url=nats://127.0.0.1:1")] == [
        "sys", "bridge", "fleet", "skel"]
    assert ("nats", "firmware_bridge.fleet.server") in planned("fleet.serve=true")
    assert "fleet" not in dict(planned("fleet.serve=true", "up.fleet=false"))
