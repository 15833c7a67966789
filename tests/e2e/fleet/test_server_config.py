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


def test_leaf_node_of_a_hub_with_a_password(tmp_path):
    text = config(tmp_path, serve="true", hub="nats-leaf://hub.local:7422,nats-leaf://hub2.local:7422",
                  leaf_password="p@ss/word")
    assert '"remotes": [{"urls": ["nats-leaf://unitbus:p%40ss%2Fword@hub.local:7422", ' \
           '"nats-leaf://unitbus:p%40ss%2Fword@hub2.local:7422"]}]' in text, text


def test_hub_accepting_leaf_nodes(tmp_path):
    text = config(tmp_path, serve="true", leaf_listen="0.0.0.0:7422", leaf_user="boards", leaf_password="secret")
    assert '"listen": "0.0.0.0:7422", "authorization": {"user": "boards", "password": "secret"}' in text, text


def test_leaf_nodes_with_an_nkey(tmp_path):
    import os

    import nkeys

    seed = tmp_path / "fleet.nk"
    seed.write_bytes(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER))
    public = nkeys.from_seed(bytearray(seed.read_bytes())).public_key.decode()
    hub = config(tmp_path, serve="true", leaf_listen="127.0.0.1:7422", nkey_seed=str(seed))
    assert f'"authorization": {{"nkey": "{public}"}}' in hub, hub
    leaf = config(tmp_path, serve="true", hub="nats-leaf://hub.local:7422", nkey_seed=str(seed))
    assert f'"nkey": "{seed.read_text()}"' in leaf and "unitbus:" not in leaf, leaf
