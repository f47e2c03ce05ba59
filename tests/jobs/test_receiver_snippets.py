"""The receiver code the README and docs/jobs.md show verifies what the gateway signs."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.jobs.signing import WebhookSecrets, new_secret

ROOT = Path(__file__).resolve().parents[2]
_BLOCK = re.compile(r"```python\n(import base64.*?def verify\(.*?)```", re.DOTALL)


def shown_verify(document: str) -> Callable[[str, dict[str, str], bytes], bool]:
    found = _BLOCK.search((ROOT / document).read_text())
    assert found is not None, f"{document} shows no verify()"
    namespace: dict[str, object] = {}
    # Our own documentation, run as a reader would paste it.
    exec(compile(found.group(1), document, "exec"), namespace)
    verify = namespace["verify"]
    assert callable(verify)
    return verify


@pytest.mark.parametrize("document", ["README.md", "docs/jobs.md"])
def test_the_shown_receiver_accepts_a_delivery_and_refuses_a_forgery(document: str) -> None:
    verify = shown_verify(document)
    old, new = new_secret(), new_secret()
    body = b'{"type": "job.completed"}'
    stamp = int(time.time())
    signed = WebhookSecrets.parse(f"{new} {old}").sign("msg_job_1", stamp, body)
    headers = {
        "webhook-id": "msg_job_1",
        "webhook-timestamp": str(stamp),
        "webhook-signature": signed,
    }
    assert verify(old, headers, body)  # rotation: either secret verifies
    assert verify(new, headers, body)
    assert not verify(new_secret(), headers, body)
    assert not verify(new, headers, body + b" ")
    stale = {**headers, "webhook-timestamp": str(stamp - 600)}
    assert not verify(new, stale, body)
