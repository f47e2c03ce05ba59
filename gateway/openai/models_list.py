"""What ``GET /v1/models`` answers a caller: the models it may call, by the names it calls them.

The upstream lists its own models, by its own names, for the gateway's upstream key. A caller
may call fewer (its key's model list; with ``allow_unlisted_models: false`` only the public
names in ``models``) and more (the model aliases). On a route with ``models_list: true`` the
gateway rewrites the upstream's successful list for the caller: this is the one response body
the gateway rewrites (besides the ``id`` of a model retrieved through an alias,
``model_as_alias``). Both are small JSON documents, read whole within ``MAX_BODY_BYTES``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from gateway.auth import Principal
from gateway.config.model import ModelAlias

# The most of a model list (or a retrieved model) read to rewrite it, before and after inflating:
# OpenAI's list is ~10 KiB, large aggregators list a few hundred models in under 1 MiB.
MAX_BODY_BYTES = 4 * 1024 * 1024
# Who an alias entry says owns it when the upstream does not list the alias's target.
GATEWAY_OWNER = "gateway"


def rewrites_list(principal: Principal, aliases: Mapping[str, ModelAlias], unlisted: bool) -> bool:
    """Whether the list differs for this caller: otherwise it is relayed byte for byte."""
    return not principal.all_models or not unlisted or bool(aliases)


def list_for_caller(
    body: bytes,
    *,
    principal: Principal,
    aliases: Mapping[str, ModelAlias],
    unlisted: bool,
    upstream: str,
) -> bytes | None:
    """The upstream's list (``{"object": "list", "data": [...]}``) as this caller sees it, or
    None when it is not such a list.

    Kept, unchanged and in order: the upstream's entries the key may use, when unlisted models
    pass (``unlisted``; otherwise only the public names in ``models`` are routable), and those
    that a model alias sends back to this same upstream under the same name. Added: one entry
    per other model alias the key may use, with its target's ``created`` and ``owned_by`` when
    this upstream lists the target. An upstream entry named like an alias that goes elsewhere
    is left out: requests for that name go where the alias says."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(document, dict) or not isinstance(document.get("data"), list):
        return None
    listed: dict[str, dict[str, Any]] = {}
    data: list[dict[str, Any]] = []
    for entry in document["data"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
            continue  # cannot be checked against the key's rules: left out
        model = entry["id"]
        listed.setdefault(model, entry)
        alias = aliases.get(model)
        routable = unlisted if alias is None else _same_model(alias, model, upstream)
        if routable and principal.may_use_model(model):
            data.append(entry)
    for name, alias in aliases.items():
        if _same_model(alias, name, upstream) and name in listed:
            continue  # the upstream's own entry, kept above if the key may use it
        if not principal.may_use_model(name):
            continue
        target = listed.get(alias.model or name) if alias.upstream == upstream else None
        created = target.get("created") if target is not None else None
        owned_by = target.get("owned_by") if target is not None else None
        data.append(
            {
                "id": name,
                "object": "model",
                "created": created if isinstance(created, int) else 0,
                "owned_by": owned_by if isinstance(owned_by, str) else GATEWAY_OWNER,
            }
        )
    return orjson.dumps({**document, "data": data})


def _same_model(alias: ModelAlias, name: str, upstream: str) -> bool:
    """Whether ``alias`` (public ``name``) is the model this upstream lists as ``name``."""
    return alias.upstream == upstream and (alias.model is None or alias.model == name)


def model_as_alias(body: bytes, *, alias: str) -> bytes | None:
    """A retrieved model (fetched under the upstream's name) answered under ``alias``, the name
    the caller asked for; None when the body is not a JSON object."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(document, dict):
        return None
    return orjson.dumps({**document, "id": alias})
