"""The configuration of the nats-server a board serves (protocol.md §21.2, §21.7), checked by nats-server itself."""
from __future__ import annotations

import subprocess

from core.settings import Settings
from firmware_bridge.fleet.server import render_config, server_binary
from firmware_bridge.fleet.wire import model_subject


def config(tmp_path, **values) -> str:
    settings = Settings.load(tmp_path / "absent.toml", {f"fleet.{k}": v for k, v in values.items()}, environ={})
    text = render_config(settings)
    path = tmp_path / "nats.conf"
    path.write_text(text)
    test = subprocess.run([server_binary(), "-c", str(path), "-t"], capture_output=True, text=True)
    assert test.returncode == 0, test.stderr + text
    return text


def test_token_listen_and_tight_pings(tmp_path):
    text = config(tmp_path, serve="true", listen="0.0.0.0:4333", token='to"ken')
    assert 'listen: "0.0.0.0:4333"' in text and 'token: "to\\"ken"' in text and "ping_max: 2" in text


def test_no_credentials_means_no_authorization_block(tmp_path):
    assert "authorization" not in config(tmp_path, serve="true")


def test_model_subjects_escape_dots():
    assert model_subject("qwen2.5-0.5B") == "unitbus.model.qwen2~2e5-0~2e5B"
    assert model_subject("smollm2-135m-instruct") == "unitbus.model.smollm2-135m-instruct"
