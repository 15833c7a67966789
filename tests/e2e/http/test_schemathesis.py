"""Every route of every listener fuzzed by schemathesis from the OpenAPI document the real gateway serves
(issue 14 item 9): no 5xx at all, every status and body as documented, 501 only where a route is
documented as unsupported. Examples are bounded so the whole test stays short."""
from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,
                                               status_code_conformance)

APIS = ("openai", "ollama", "ai00", "cortex")
# Per operation. Ai00's routes all run the model (it has one current model, no name to get wrong).
EXAMPLES = {"openai": 20, "ollama": 20, "ai00": 6, "cortex": 20}
# Never-ending by design (a state tick every 0.5 s until the client leaves): test_bad_bodies covers it.
ENDLESS = {("GET", "/api/models/state")}


def short_generation(case) -> None:
    """Generated bodies that leave out the token limit would each run a whole default-length answer
    (Ai00's is 256 tokens): give those a small one, keeping the body schema-valid."""
    if not isinstance(case.body, dict):
        return
    if case.path.endswith("completions"):
        case.body.setdefault("max_tokens", 4)
    elif case.path in ("/api/generate", "/api/chat"):
        options = case.body.get("options")
        if options is None or isinstance(options, dict):
            case.body["options"] = {"num_predict": 4, **(options or {})}


def no_server_error(case, response) -> None:
    """No 5xx, except a 501 from a route whose description says when it is unsupported, and a 503 with
    Retry-After (the stack runs only the llm unit: a tts model is installed but its unit is not running)."""
    status = response.status_code
    if status == 501 and "unsupported" in (case.operation.definition.raw.get("description") or ""):
        return
    if status == 503 and "retry-after" in {name.lower() for name in response.headers}:
        return
    assert status < 500, f"{case.operation.label} answered {status}: {response.text[:300]}"


@pytest.mark.parametrize("api", APIS)
def test_every_route_matches_its_schema(http_stack, api):
    schema = schemathesis.openapi.from_url(http_stack.url(api, "/openapi.json"))
    operations = [result.ok() for result in schema.get_all_operations()]
    assert operations
    failures = []
    for operation in operations:
        if (operation.method.upper(), operation.path) in ENDLESS:
            continue

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES[api], deadline=None, database=None, derandomize=True,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        def fuzz(case):
            short_generation(case)
            response = case.call(base_url=http_stack.url(api), timeout=120)
            no_server_error(case, response)
            case.validate_response(response, checks=[status_code_conformance, content_type_conformance,
                                                     response_schema_conformance])

        try:
            fuzz()
        except (Exception, BaseExceptionGroup) as exc:  # gather every operation's failure, not only the first
            failures.append(f"{operation.method.upper()} {operation.path}: {exc}")
    assert not failures, "\n\n".join(failures)
