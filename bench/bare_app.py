"""The Python ceiling: a bare ASGI app under uvicorn that answers the benchmark's requests itself.

It reads the request body, then sends a fixed response: the chat.completion body, or (when the
request asks for ``"stream":true``) one ``http.response.body`` message per SSE event.
``bench/run.py`` captures both, with their headers, from the fake upstream first and passes them
in with ``--sample``, so the bare app sends the bytes the gateway relays. uvicorn runs it with
the gateway's settings (httptools, uvloop, no access log, no Server or Date header).

    python bench/bare_app.py --port 8001 [--sample sample.json]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from pathlib import Path
from typing import Any

import uvicorn

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
RawHeaders = list[tuple[bytes, bytes]]

# Used when no sample is given: a chat.completion of the usual shape, and a 50-piece stream.
_DEFAULT_BODY = (
    b'{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,'
    b'"model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant",'
    b'"content":"Hello! How can I help you today?"},"finish_reason":"stop"}],'
    b'"usage":{"prompt_tokens":9,"completion_tokens":9,"total_tokens":18}}'
)
_DEFAULT_EVENTS = tuple(
    b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1700000000,'
    b'"model":"gpt-4o-mini","choices":[{"index":0,"delta":{"content":"tok%d"}}]}\n\n' % i
    for i in range(50)
)


class BareApp:
    def __init__(
        self,
        body: bytes,
        events: Sequence[bytes],
        headers: RawHeaders | None = None,
        stream_headers: RawHeaders | None = None,
    ) -> None:
        self.body = body
        self.events = tuple(events)
        self.json_headers = [
            *(headers or [(b"content-type", b"application/json")]),
            (b"content-length", b"%d" % len(body)),
        ]
        self.sse_headers = stream_headers or [(b"content-type", b"text/event-stream")]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        request = b""
        more = True
        while more:
            message = await receive()
            request += message.get("body", b"")
            more = message.get("more_body", False)
        if b'"stream":true' in request or b'"stream": true' in request:
            await send({"type": "http.response.start", "status": 200, "headers": self.sse_headers})
            for event in self.events:
                await send({"type": "http.response.body", "body": event, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        else:
            await send({"type": "http.response.start", "status": 200, "headers": self.json_headers})
            await send({"type": "http.response.body", "body": self.body})


def load_app(sample: Path | None) -> BareApp:
    """``sample`` is JSON: {"body": str, "events": [str], "headers": [[name, value]],
    "stream_headers": [[name, value]]}, the bytes as UTF-8 text; framing headers left out."""
    if sample is None:
        return BareApp(_DEFAULT_BODY, _DEFAULT_EVENTS)
    data = json.loads(sample.read_text())

    def headers(pairs: list[list[str]]) -> RawHeaders:
        return [(name.lower().encode(), value.encode()) for name, value in pairs]

    return BareApp(
        data["body"].encode(),
        [event.encode() for event in data["events"]],
        headers(data["headers"]),
        headers(data["stream_headers"]),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--sample", type=Path)
    args = parser.parse_args()
    uvicorn.run(
        load_app(args.sample),
        host=args.host,
        port=args.port,
        http="httptools",
        loop="uvloop",
        lifespan="off",
        server_header=False,
        date_header=False,
        access_log=False,
        log_level="warning",
        timeout_keep_alive=75,
    )


if __name__ == "__main__":
    main()
