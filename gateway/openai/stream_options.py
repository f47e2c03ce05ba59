"""``stream_options.include_usage``: ask a streamed chat completion for its final usage."""

from __future__ import annotations

from typing import Any


def ask_for_stream_usage(document: dict[str, Any]) -> bool:
    """Add ``stream_options.include_usage`` to a stream request that did not ask for it, so
    token limits settle exactly; True if the document changed. The client then receives the
    final usage chunk (empty ``choices``) exactly as the upstream sends it, as if it had asked
    itself."""
    if document.get("stream") is not True:
        return False
    options = document.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        return False
    document["stream_options"] = {
        **(options if isinstance(options, dict) else {}),
        "include_usage": True,
    }
    return True
