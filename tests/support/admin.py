"""The admin API as tests call it: the admin key the test configs accept, and a JSON getter."""

from __future__ import annotations

from typing import Any

import httpx

from gateway.auth import hash_key

ADMIN_KEY = "adm-test-operator-key"
ADMIN_HEADERS = {"authorization": f"Bearer {ADMIN_KEY}"}
# The YAML section that turns the admin API on with ADMIN_KEY.
ADMIN_SECTION = f"admin:\n  keys:\n    - {{name: ops, hash: {hash_key(ADMIN_KEY)}}}\n"


def admin_get(base_url: str, name: str, timeout: float = 5.0) -> Any:
    """``GET /admin/<name>`` with the admin key; the JSON body (raises on a non-200)."""
    response = httpx.get(f"{base_url}/admin/{name}", headers=ADMIN_HEADERS, timeout=timeout)
    response.raise_for_status()
    return response.json()
