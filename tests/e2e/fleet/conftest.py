"""Two boards, alpha and beta, each its own `unitbus up`, joined through one nats-server."""
from __future__ import annotations

import pytest

from fleet_support import NatsServer, board, wait_joined
from support import free_port


OPENAI_BALANCED = {"up.http": "true", "http.openai.port": str(free_port()), "fleet.balance": "true",
                   **{f"http.{api}.enabled": "false" for api in ("ollama", "ai00", "cortex")}}


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory):
    server = NatsServer(tmp_path_factory.mktemp("nats"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def two_boards(tmp_path_factory, nats_server):
    # alpha also runs the OpenAI gateway, whose llm inferences go to any board serving the model.
    a = board(tmp_path_factory.mktemp("alpha"), "alpha", nats_server.url, **OPENAI_BALANCED).start(timeout=300)
    b = board(tmp_path_factory.mktemp("beta"), "beta", nats_server.url).start(timeout=300)
    try:
        wait_joined(a, "alpha", "beta")
        wait_joined(b, "alpha", "beta")
        yield a, b
    finally:
        codes = [b.stop(check=False), a.stop(check=False)]
    assert codes == [0, 0], (a.log()[-3000:], b.log()[-3000:])
