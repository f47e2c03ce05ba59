"""The model rules: may this key use the model a request names, and where does it go?

A model is named in a JSON body's ``model``, a form's ``model`` field (uploads), or the path
(``GET /v1/models/{model}``); a model list is filtered for the caller. Each function applies the
key's allowed models and the model alias table and says which upstream serves the request and
under which name.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from urllib.parse import quote, unquote

from gateway import errors
from gateway.auth import Principal
from gateway.config.upstreams import ModelAlias
from gateway.http import multipart
from gateway.openai import models_list
from gateway.pipeline.dispatch import Rename
from gateway.routing import Match
from gateway.runtime import Runtime
from gateway.types import Body, RawHeaders
from gateway.upstream.group import UpstreamGroup

# Turns the upstream's whole successful JSON body into the one sent to the client; None when
# the body is not what it expects (see ``openai/models_list.py``).
Rewrite = Callable[[bytes], bytes | None]


@dataclasses.dataclass(frozen=True, slots=True)
class Resolved:
    upstream: UpstreamGroup
    model: str | None  # the public name, as the client gave it
    renamed: str | None  # the upstream's name for it, when it differs
    alias: ModelAlias | None = None  # its fallback chain, when it has one


def resolve_model(
    runtime: Runtime, principal: Principal, model: object, route_upstream: UpstreamGroup
) -> Resolved:
    """Apply the key's model rule and the alias table to a body's ``model``."""
    if model is None:
        # No model: the upstream answers as it would have directly.
        return Resolved(route_upstream, None, None)
    if not isinstance(model, str):
        raise errors.invalid_model_type()
    if not principal.may_use_model(model):
        raise errors.model_not_allowed(model)
    alias = runtime.models.get(model)
    if alias is None:
        if not runtime.config.allow_unlisted_models:
            raise errors.unknown_model(model)
        return Resolved(route_upstream, model, None)
    upstream_model = alias.model or model
    renamed = upstream_model if upstream_model != model else None
    return Resolved(runtime.upstreams[alias.upstream], model, renamed, alias)


def resolve_form_model(
    runtime: Runtime,
    principal: Principal,
    headers: RawHeaders,
    payload: Body,
    route_upstream: UpstreamGroup,
) -> tuple[Resolved, Body, Rename | None]:
    """The model rules for a ``multipart/form-data`` body (uploads: audio, files): its
    ``model`` field is read like a JSON body's ``model``. A form without one passes, as a JSON
    body without one does (``files.create``). A renaming alias rewrites only the field's value;
    every other byte of the form goes upstream as the client sent it. The third value writes
    another name into the client's form (for a target or fallback that names the model its
    own way)."""
    form_boundary = multipart.boundary(headers)
    found = multipart.find_model(payload, form_boundary)
    if found is None:
        return Resolved(route_upstream, None, None), payload, None
    resolved = resolve_model(runtime, principal, found.value, route_upstream)
    rename = functools.partial(_form_with_model, payload, found, form_boundary)
    if resolved.renamed is not None:
        payload = rename(resolved.renamed)
    return resolved, payload, rename


def _form_with_model(
    payload: Body, found: multipart.FormModel, form_boundary: bytes, model: str
) -> Body:
    return multipart.with_model(payload, found, model, form_boundary)


def resolve_path_model(
    runtime: Runtime,
    principal: Principal,
    match: Match,
    param: str,
    route_upstream: UpstreamGroup,
) -> tuple[Resolved, Match, Rewrite | None]:
    """The model rules for a model named in the path (``GET /v1/models/{model}``).

    A model the key may not use does not exist for it: 404, as OpenAI answers. An alias is asked
    of its upstream under the upstream's name, and its answer's ``id`` is the alias."""
    model = unquote(match.params[param])
    if not principal.may_use_model(model):
        raise errors.unknown_model(model)
    alias = runtime.models.get(model)
    if alias is None:
        if not runtime.config.allow_unlisted_models:
            raise errors.unknown_model(model)
        return Resolved(route_upstream, model, None), match, None
    upstream = runtime.upstreams[alias.upstream]
    upstream_model = alias.model or model
    if upstream_model == model:
        return Resolved(upstream, model, None), match, None
    # Encoded as a client encodes an id in a path: an 'org/name' id as one segment.
    params = {**match.params, param: quote(upstream_model, safe="")}
    renamed = dataclasses.replace(
        match, upstream_path=match.endpoint.target.fill(params), params=params
    )
    rewrite = functools.partial(models_list.model_as_alias, alias=model)
    return Resolved(upstream, model, upstream_model), renamed, rewrite


def model_list_rewrite(
    runtime: Runtime, principal: Principal, upstream: UpstreamGroup
) -> Rewrite | None:
    """How the upstream's model list is rewritten for this caller; None when it would not
    change (every model allowed, unlisted ones too, no aliases): then it is relayed raw."""
    aliases = runtime.models
    unlisted = runtime.config.allow_unlisted_models
    if not models_list.rewrites_list(principal, aliases, unlisted):
        return None
    return functools.partial(
        models_list.list_for_caller,
        principal=principal,
        aliases=aliases,
        unlisted=unlisted,
        upstream=upstream.name,
    )
