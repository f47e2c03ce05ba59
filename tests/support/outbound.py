"""Driving an upstream client through the seam (``gateway/upstream/seam.py``): requests as the
relay builds them, bodies read to their end."""

from __future__ import annotations

from collections.abc import Sequence

from gateway.config.model import Timeouts
from gateway.upstream.seam import OutboundRequest, UpstreamClient, UpstreamResponse


def outbound(
    method: str,
    url: str,
    *,
    headers: Sequence[tuple[str, str]] = (),
    body: bytes = b"",
    connect: float = 2.0,
    read: float = 2.0,
) -> OutboundRequest:
    return OutboundRequest(method, url, headers, body, Timeouts(connect=connect, read=read))


def get(url: str, *, connect: float = 2.0, read: float = 2.0) -> OutboundRequest:
    return outbound("GET", url, connect=connect, read=read)


def chat(
    url: str, payload: bytes, *controls: tuple[str, str], read: float = 2.0
) -> OutboundRequest:
    headers = [("content-type", "application/json"), *controls]
    path = url + "/v1/chat/completions"
    return outbound("POST", path, headers=headers, body=payload, read=read)


async def read_all(response: UpstreamResponse) -> bytes:
    parts = []
    while chunk := await response.read_chunk():
        parts.append(chunk)
    return b"".join(parts)


async def fetch(client: UpstreamClient, request: OutboundRequest) -> tuple[UpstreamResponse, bytes]:
    """Send, read the body to its end, give the connection back."""
    response = await client.send(request)
    body = await read_all(response)
    response.release()
    return response, body
