"""The OpenAPI document of the public routes (``gateway/endpoints/openapi.py``), as a running
gateway serves it at ``/openapi.json``."""

from __future__ import annotations

import httpx

from tests.support.gatewayproc import GatewayProcess


def test_openapi_lists_routes_and_aliases_with_deprecated_ones_marked(
    gateway: GatewayProcess,
) -> None:
    document = httpx.get(f"{gateway.url}/openapi.json").json()
    assert document["openapi"].startswith("3.1")
    paths = document["paths"]
    assert paths["/v1/chat/completions"]["post"].get("deprecated") is None
    assert paths["/chat/completions"]["post"].get("deprecated") is None
    old = paths["/openai/v1/chat/completions"]["post"]
    assert old["deprecated"] is True
    assert old["x-sunset"] == "2027-06-30"
    assert old["x-successor"] == "/v1/chat/completions"
    # The catch-all is written as an OpenAPI path template, with its parameter declared.
    assert set(paths["/v1/{rest}"]) == {"get", "post", "delete"}
    assert paths["/v1/{rest}"]["get"]["parameters"][0]["name"] == "rest"


def test_forwarded_prefix_from_trusted_proxy_shows_in_openapi_servers(
    gateway: GatewayProcess,
) -> None:
    document = httpx.get(
        f"{gateway.url}/openapi.json", headers={"x-forwarded-prefix": "/llm"}
    ).json()
    assert document["servers"] == [{"url": "/llm"}]


def test_openapi_describes_the_jobs_api_and_prefer_on_every_route(gateway: GatewayProcess) -> None:
    document = httpx.get(f"{gateway.url}/openapi.json").json()
    paths = document["paths"]
    assert set(paths["/v1/jobs"]) == {"get", "post"}
    assert set(paths["/v1/jobs/{job_id}"]) == {"get", "delete"}
    assert "get" in paths["/v1/jobs/{job_id}/result"]
    assert "post" in paths["/v1/jobs/{job_id}/cancel"]
    chat = paths["/v1/chat/completions"]["post"]
    assert any(p["name"] == "Prefer" and p["in"] == "header" for p in chat["parameters"])
    assert chat["responses"]["202"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Job"
    }
    assert "Job" in document["components"]["schemas"]
