"""An OpenAPI 3.1 document of what the gateway serves: every public path, alias and method.

Consumers see one document for the gateway; deprecated aliases are marked ``deprecated`` with
their sunset and successor, so generated clients warn where the headers would.
"""

from __future__ import annotations

import re
from typing import Any

from gateway import __version__
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


_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(?::path)?\}")


def _parameters(path: str) -> list[dict[str, Any]]:
    return [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in _PARAM.findall(path)
    ]


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
            # OpenAPI path templates have no catch-all syntax: '{rest:path}' becomes '{rest}'.
            public = _PARAM.sub(r"{\1}", endpoint.public_path)
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
