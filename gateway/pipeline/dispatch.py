"""What admission decided about an admitted request, in the form every attempt is built from.

Admission checks the request once; the failover loop may then send it several times, to several
targets of several upstreams (a fallback chain). Each attempt's outbound request is built here
from the same client bytes: the body is replayed byte for byte, and re-serialised only when the
step or the target names the model differently (``Target.models``), once per name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.config.model import Timeouts
from gateway.config.upstreams import FallbackOn
from gateway.http.headers import upstream_request_headers
from gateway.types import Body, RawHeaders
from gateway.upstream.group import UpstreamGroup
from gateway.upstream.seam import OutboundRequest
from gateway.upstream.targets import UpstreamTarget

# A body with its model renamed: ``rename(name)`` is the client's body with that model name.
Rename = Callable[[str], Body]


@dataclass(frozen=True, slots=True)
class Step:
    """One link of a request's chain: an upstream, and the model name it is asked for (None:
    the body goes as the client sent it)."""

    group: UpstreamGroup
    model: str | None = None


@dataclass(slots=True)
class Dispatch:
    method: str
    path: str  # the upstream path of the matched route, already percent-encoded
    query: bytes
    headers: RawHeaders  # the client's
    # The X-Forwarded-For value for targets that are told the client's address.
    forwarded_for: str | None
    request_id: str
    body: Body
    # The model name ``body`` carries as it stands, and how to write another one into it
    # (None: the body names no model, or cannot be rewritten).
    body_model: str | None
    rename: Rename | None
    # The route's own timeouts, else each upstream's.
    timeouts: Timeouts | None
    steps: tuple[Step, ...]
    fallback_on: tuple[FallbackOn, ...] = ()
    # Whether responses name the target that served them (X-Gateway-Target).
    target_header: bool = True
    _bodies: dict[str, Body] = field(default_factory=dict)

    @property
    def first(self) -> Step:
        return self.steps[0]

    def outbound(self, step: Step, target: UpstreamTarget, model: str | None) -> OutboundRequest:
        """The request for ``target`` at ``step``, asking for ``model`` (``model_for``)."""
        return OutboundRequest(
            method=self.method,
            url=target.url(self.path, self.query),
            headers=upstream_request_headers(
                self.headers,
                target.added_headers,
                self.forwarded_for if target.append_forwarded_for else None,
                replaced=target.added_names,
                request_id=self.request_id,
            ),
            body=self.body_for(model),
            timeouts=self.timeouts or step.group.config.timeouts,
        )

    def model_for(self, step: Step, target: UpstreamTarget) -> str | None:
        """The model name ``target`` is asked for at ``step``: the body's own when it cannot be
        rewritten (no ``rename``: a body without a readable model, or a model in the path)."""
        if self.rename is None:
            return self.body_model
        model = step.model if step.model is not None else self.body_model
        if model is None:
            return None
        return target.models.get(model, model)

    def body_for(self, model: str | None) -> Body:
        if model is None or model == self.body_model or self.rename is None:
            return self.body
        body = self._bodies.get(model)
        if body is None:
            body = self._bodies[model] = self.rename(model)
        return body
