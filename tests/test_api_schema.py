"""Schemathesis over the service's own OpenAPI spec, against a real uvicorn server: no input gives a 5xx.

Examples per operation are bounded so that the whole module stays well under two minutes on a
2-core CPU. Besides "no server error", responses must match the documented status codes, content
types and schemas (errors included: every 4xx is documented as `{"error": {"code", "message"}}`).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi import checks as openapi_checks
from test_api import KEY

from loragen.api import ApiSettings, create_app
from loragen.embeddings import TextEncoder

from conftest import uvicorn_server

# Refusals of schema-valid bodies that depend on the loaded base model, the server's settings or
# the contents of an uploaded file, as the schema's descriptions say (e.g. a prompt's tokens against
# the base model's context; adapter bytes that are not a safetensors file).
DOCUMENTED_REFUSALS = {"limit_exceeded", "over_memory_budget", "invalid_adapter"}


def positive_data_acceptance(ctx, response, case):  # type: ignore[no-untyped-def]
    """schemathesis' check, but for the documented refusals above."""
    try:
        code = response.json()["error"]["code"]
    except Exception:
        code = None
    if code in DOCUMENTED_REFUSALS:
        return None
    return openapi_checks.positive_data_acceptance(ctx, response, case)


# Every check schemathesis has for OpenAPI but object_level_authorization (every key may act on
# every object here).
CHECKS = [not_a_server_error, positive_data_acceptance, *(getattr(openapi_checks, name) for name in (
    "status_code_conformance", "content_type_conformance", "response_headers_conformance",
    "response_schema_conformance", "negative_data_rejection", "missing_required_header",
    "unsupported_method", "allow_header_conformance", "use_after_free", "ensure_resource_availability",
    "ignored_auth"))]


@pytest.fixture(scope="module")
def server(world: Path, encoder: TextEncoder):  # noqa: F811
    settings_ = ApiSettings(registry=world / "registry", generator=world / "generators", home=world / "home",
                            api_keys=[KEY], max_wait_ms=1, max_body_bytes=2**20)
    with uvicorn_server(create_app(settings_, encoder=encoder)) as url:
        yield url


# The spec does not depend on the registry, so it is read from an app that never starts. (Loading it
# lazily from a fixture, `schemathesis.pytest.from_fixture`, fails on pytest 9.)
schema = schemathesis.openapi.from_dict(create_app(ApiSettings(api_keys=[KEY])).openapi())


@schema.parametrize()
@settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_input_gives_a_server_error(case: schemathesis.Case, server: str) -> None:
    case.call_and_validate(base_url=server, headers={"Authorization": f"Bearer {KEY}"}, checks=CHECKS, timeout=60)


def test_the_schema_refuses_what_the_server_refuses() -> None:
    """Bodies the server refuses with 422 are invalid in its own schema, and the other way round."""
    from jsonschema_rs import Draft202012Validator

    spec = create_app(ApiSettings(api_keys=[KEY])).openapi()

    def valid(model: str, body: object) -> bool:
        schema = {"$ref": f"#/components/schemas/{model}", "components": spec["components"]}
        return Draft202012Validator(schema).is_valid(body)

    assert not valid("GenerateRequest", {"description": "ok", "seed": False})
    assert not valid("GenerateRequest", {"description": "ok", "method": ""})
    assert not valid("BatchRequest", {"descriptions": ["a", ""]})
    assert not valid("BatchRequest", {"descriptions": ["a" * 4001]})
    assert not valid("SearchRequest", {"description": "ok", "method": ""})
    assert not valid("CompletionRequest", {"prompt": "a", "description": "x", "lora_id": "lora-1"})
    assert valid("CompletionRequest", {"prompt": "a", "description": None, "lora_id": "lora-1"})
    assert valid("CompletionRequest", {"prompt": "a", "description": "x"})
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    assert not valid("ChatCompletionRequest", {**chat, "examples": [{"input": "a", "output": "b"}]})
    assert not valid("ChatCompletionRequest", {**chat, "examples": [], "description": None})
    assert valid("ChatCompletionRequest", {**chat, "examples": [{"input": "a", "output": "b"}], "description": "x"})
    assert valid("ChatCompletionRequest", {**chat, "examples": None})
    assert not valid("ChatCompletionRequest", {**chat, "description": "x", "lora_id": "lora-1"})
    assert valid("BatchRequest", {"descriptions": ["a"], "seed": 3})
    assert not valid("CompletionRequest", {"prompt": "a", "stop": ["a"] * 5})
    assert not valid("GenerateRequest", {"description": "ok", "k": 0})
    assert valid("GenerateRequest", {"description": "ok", "k": 2.0})  # an integer in JSON Schema; the server agrees
    assert not valid("GenerateRequest", {"description": "ok", "method": "bogus"})  # methods are an enum
    assert not valid("SearchRequest", {"description": "ok", "method": "bogus"})
    assert valid("SearchRequest", {"description": "ok", "method": None})
    for blank in (" ", "\n\t", "\x1c"):  # what str.strip() empties is blank
        assert not valid("GenerateRequest", {"description": blank})
        assert not valid("BatchRequest", {"descriptions": ["a", blank]})
        assert not valid("CompletionRequest", {"prompt": "a", "description": blank})
    assert valid("GenerateRequest", {"description": " a "})
    assert not valid("GenerateRequest", {"description": "ok", "examples": [{"input": "a" * 4001, "output": "b"}]})
    assert not valid("GenerateRequest", {"description": "ok", "examples": [{"input": "a", "output": "b"}] * 65})
    assert not valid("GenerateRequest", {"description": "ok", "examples": [{"input": "a"}]})
    assert valid("GenerateRequest", {"description": "ok", "examples": [{"input": "a", "output": "b", "note": ""}]})


def test_the_schema_documents_the_limits_it_cannot_state() -> None:
    """Limits set by the settings or the base model are named in the fields' descriptions, and every
    route documents 429 (4XX, with its message) and 504."""
    spec = create_app(ApiSettings(api_keys=[KEY])).openapi()
    props = {name: spec["components"]["schemas"][name]["properties"]
             for name in ("GenerateRequest", "BatchRequest", "CompletionRequest")}
    assert "max_example_chars" in props["GenerateRequest"]["examples"]["description"]
    assert "max_batch_chars" in props["BatchRequest"]["descriptions"]["description"]
    assert "context" in props["CompletionRequest"]["prompt"]["description"]
    assert props["GenerateRequest"]["k"]["anyOf"][0]["maximum"] == 64
    assert props["GenerateRequest"]["examples"]["anyOf"][0]["maxItems"] == 64
    form = spec["components"]["schemas"]["Body_add_expert_v1_experts_post"]["properties"]["description"]["items"]
    assert form["minLength"] == 1 and form["pattern"]
    for operations in spec["paths"].values():
        for op in operations.values():
            assert {"4XX", "503", "504"} <= set(op["responses"]), op["summary"]


def test_options_and_other_methods_get_405_with_every_allowed_method() -> None:
    """`Allow` lists exactly the methods the schema documents for the path, e.g. GET and POST
    on /v1/experts, not only the first route's."""
    from fastapi.testclient import TestClient

    app = create_app(ApiSettings(api_keys=[KEY]))
    spec = app.openapi()
    http = TestClient(app)  # no lifespan: routing answers before the service is needed
    for path, operations in spec["paths"].items():
        url = path.replace("{lora_id}", "lora-x").replace("{key}", "1")
        documented = {m.upper() for m in operations}
        for method in ("OPTIONS", "PATCH"):
            r = http.request(method, url)
            assert r.status_code == 405, (method, path, r.text)
            assert set(r.headers["allow"].split(", ")) == documented, (method, path, r.headers.get("allow"))
            assert r.json()["error"]["code"] == "method_not_allowed"
