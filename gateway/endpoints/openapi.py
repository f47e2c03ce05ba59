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


def openapi_document(table: RouteTable, root_path: str) -> dict[str, Any]:
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
            if parameters:
                operation["parameters"] = parameters
            public = _openapi_path(endpoint.public_path)
            paths.setdefault(public, {})[method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": "LLM gateway", "version": __version__},
        "servers": [{"url": root_path or "/"}],
        "paths": paths,
        "components": {
            "schemas": {"Error": _ERROR},
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
            },
        },
    }
