"""An OpenAPI 3.1 document of what the gateway serves: every public path, alias and method.

Consumers see one document for the gateway; deprecated aliases are marked ``deprecated`` with
their sunset and successor, so generated clients warn where the headers would.
"""

from __future__ import annotations

from typing import Any

from gateway import __version__
from gateway.config.templates import split_template
from gateway.routing import RouteTable

_ERROR = {
    "type": "object",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
            "required": ["message", "type", "param", "code"],
        }
    },
}


def _parameters(path: str) -> list[dict[str, Any]]:
    return [
        {"name": piece.name, "in": "path", "required": True, "schema": {"type": "string"}}
        for piece in split_template(path)
        if not isinstance(piece, str)
    ]


def _openapi_path(path: str) -> str:
    """OpenAPI path templates have no catch-all syntax: '{rest:path}' becomes '{rest}'."""
    return "".join(p if isinstance(p, str) else f"{{{p.name}}}" for p in split_template(path))


_JOB = {
    "type": "object",
    "properties": {
        "id": {"type": "string"},
        "object": {"const": "job"},
        "status": {
            "enum": ["queued", "in_progress", "completed", "failed", "cancelled", "expired"]
        },
        "created_at": {"type": "number"},
        "started_at": {"type": ["number", "null"]},
        "finished_at": {"type": ["number", "null"]},
        "expires_at": {"type": "number"},
        "attempts": {"type": "integer"},
        "cancel_requested": {"type": "boolean"},
        "request": {"type": "object"},
        "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
        "response": {"type": ["object", "null"]},
        "error": {"type": ["object", "null"]},
        "webhook": {"type": ["object", "null"]},
    },
    "required": ["id", "object", "status", "created_at"],
}
_PREFER = {
    "name": "Prefer",
    "in": "header",
    "required": False,
    "schema": {"type": "string"},
    "description": "'respond-async' runs the request as a job: 202 with Location "
    "(RFC 7240); 'wait=N' too answers synchronously if it ends within N seconds.",
}


def _json(schema: str, description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
    }


def _jobs_operation(operation_id: str, summary: str, answer: dict[str, Any]) -> dict[str, Any]:
    return {
        "operationId": operation_id,
        "summary": summary,
        "tags": ["jobs"],
        "security": [{"bearer": []}, {"apiKey": []}],
        "responses": {**answer, "default": _json("Error", "An error in OpenAI's shape.")},
    }


def _jobs_paths() -> dict[str, dict[str, Any]]:
    """The jobs API (gateway/endpoints/jobs.py, docs/jobs.md)."""
    job_id = [{"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}]
    job = {"200": _json("Job", "The job.")}
    return {
        "/v1/jobs": {
            "get": _jobs_operation(
                "jobs.list", "The caller's jobs, newest first", {"200": {"description": "A page."}}
            ),
            "post": _jobs_operation(
                "jobs.submit",
                "Submit a job: {method, path, body, webhook, metadata}",
                {"202": _json("Job", "Accepted; Location names the job.")},
            ),
        },
        "/v1/jobs/{job_id}": {
            "get": {**_jobs_operation("jobs.get", "A job", job), "parameters": job_id},
            "delete": {**_jobs_operation("jobs.cancel", "Cancel a job", job), "parameters": job_id},
        },
        "/v1/jobs/{job_id}/result": {
            "get": {
                **_jobs_operation(
                    "jobs.result",
                    "The upstream's answer, as it came",
                    {"200": {"description": "The answer: its status, headers and body."}},
                ),
                "parameters": job_id,
            }
        },
        "/v1/jobs/{job_id}/cancel": {
            "post": {
                **_jobs_operation("jobs.cancel.post", "Cancel a job", job),
                "parameters": job_id,
            }
        },
    }


def openapi_document(table: RouteTable, root_path: str, *, jobs: bool = False) -> dict[str, Any]:
    """``jobs``: the jobs API is served (``jobs.enabled``): its paths, and ``Prefer`` with a
    202 on every route."""
    paths: dict[str, dict[str, Any]] = {}
    for endpoint in table.endpoints:
        route = endpoint.route
        alias = endpoint.alias
        for method in route.methods:
            operation: dict[str, Any] = {
                "operationId": f"{route.name}.{method.lower()}"
                + (f".{endpoint.public_path}" if alias else ""),
                "summary": f"Route '{route.name}' (upstream '{route.upstream}')",
                "tags": [route.name],
                "security": [{"bearer": []}, {"apiKey": []}],
                "responses": {
                    "200": {"description": "The upstream's response, relayed unchanged."},
                    "default": {
                        "description": "An error in OpenAI's shape.",
                        "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}
                        },
                    },
                },
            }
            if alias is not None and alias.deprecated is not False:
                operation["deprecated"] = True
                if alias.sunset is not None:
                    operation["x-sunset"] = alias.sunset.isoformat()
                if alias.successor is not None:
                    operation["x-successor"] = root_path + alias.successor
            parameters = _parameters(endpoint.public_path)
            if jobs:
                parameters.append(_PREFER)
                operation["responses"]["202"] = _json("Job", "Accepted as a job.")
            if parameters:
                operation["parameters"] = parameters
            public = _openapi_path(endpoint.public_path)
            paths.setdefault(public, {})[method.lower()] = operation
    if jobs:
        paths.update(_jobs_paths())
    return {
        "openapi": "3.1.0",
        "info": {"title": "LLM gateway", "version": __version__},
        "servers": [{"url": root_path or "/"}],
        "paths": paths,
        "components": {
            "schemas": {"Error": _ERROR, "Job": _JOB},
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
            },
        },
    }
