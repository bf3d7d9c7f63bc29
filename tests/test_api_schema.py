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
from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,
                                               status_code_conformance)
from test_api import KEY

from loragen.api import ApiSettings, create_app
from loragen.embeddings import TextEncoder

from conftest import uvicorn_server

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


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
    assert valid("BatchRequest", {"descriptions": ["a"], "seed": 3})
    assert not valid("GenerateRequest", {"description": "ok", "examples": [{"input": "a"}]})
    assert valid("GenerateRequest", {"description": "ok", "examples": [{"input": "a", "output": "b", "note": ""}]})


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
