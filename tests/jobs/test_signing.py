"""Webhook secrets and signatures (Standard Webhooks), checked against the reference library."""

from __future__ import annotations

import base64
import time
from datetime import UTC, datetime

import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from gateway.cli import main
from gateway.jobs.signing import (
    SecretError,
    VerificationError,
    WebhookSecrets,
    load_secrets,
    new_secret,
    signature,
    verify,
)

BODY = b'{"type":"job.completed","data":{"id":"job_1"}}'


def _secret(size: int) -> str:
    return "whsec_" + base64.b64encode(bytes(range(size))).decode()


def test_a_signature_is_what_the_reference_library_computes() -> None:
    secret = new_secret()
    stamp = int(time.time())
    ours = WebhookSecrets.parse(secret).sign("msg_job_1", stamp, BODY)
    theirs = Webhook(secret).sign("msg_job_1", datetime.fromtimestamp(stamp, UTC), BODY)
    assert ours == theirs
    headers = {
        "webhook-id": "msg_job_1",
        "webhook-timestamp": str(stamp),
        "webhook-signature": ours,
    }
    Webhook(secret).verify(BODY, headers, json_parse=False)
    assert verify(secret, headers, BODY) == "msg_job_1"


def test_rotation_signs_with_every_secret_and_each_verifies() -> None:
    new, old = new_secret(), new_secret()
    stamp = int(time.time())
    header = WebhookSecrets.parse(f"{new} {old}").sign("msg_job_2", stamp, BODY)
    assert len(header.split(" ")) == 2
    headers = {
        "webhook-id": "msg_job_2",
        "webhook-timestamp": str(stamp),
        "webhook-signature": header,
    }
    for secret in (new, old):
        Webhook(secret).verify(BODY, headers, json_parse=False)
        verify(secret, headers, BODY)
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(BODY, headers, json_parse=False)
    with pytest.raises(VerificationError, match="no webhook-signature"):
        verify(new_secret(), headers, BODY)


def test_verify_refuses_what_a_receiver_must_refuse() -> None:
    secret = new_secret()
    now = time.time()
    stamp = int(now)
    good = {
        "webhook-id": "msg_a",
        "webhook-timestamp": str(stamp),
        "webhook-signature": signature(_key_of(secret), "msg_a", stamp, BODY),
    }
    assert verify(secret, good, BODY, now=now) == "msg_a"
    with pytest.raises(VerificationError, match="no webhook-signature"):
        verify(secret, good, BODY + b" ", now=now)  # one byte more: the body was changed
    with pytest.raises(VerificationError, match="tolerance"):
        verify(secret, good, BODY, now=now + 301)  # a replay, five minutes on
    with pytest.raises(VerificationError, match="tolerance"):
        verify(secret, good, BODY, now=now - 301)
    with pytest.raises(VerificationError, match="missing"):
        verify(secret, {k: v for k, v in good.items() if k != "webhook-id"}, BODY, now=now)
    with pytest.raises(VerificationError, match="Unix seconds"):
        verify(secret, {**good, "webhook-timestamp": "soon"}, BODY, now=now)
    # Another id with the same timestamp and body: the id is signed too.
    with pytest.raises(VerificationError):
        verify(secret, {**good, "webhook-id": "msg_b"}, BODY, now=now)


def _key_of(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix("whsec_"))


def test_a_new_secret_is_whsec_and_32_random_bytes() -> None:
    first, second = new_secret(), new_secret()
    assert first.startswith("whsec_")
    assert first != second
    assert len(base64.b64decode(first.removeprefix("whsec_"))) == 32
    WebhookSecrets.parse(first)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (_secret(16), "is 16 bytes; a secret needs at least 24 random bytes"),
        (_secret(65), "is 65 bytes; at most 64"),
        ("sk_" + _secret(32)[6:], "does not start with 'whsec_'"),
        ("whsec_not*base64!", "standard base64"),
    ],
)
def test_a_malformed_secret_is_refused_with_why(text: str, message: str) -> None:
    with pytest.raises(SecretError, match=message) as caught:
        WebhookSecrets.parse(text, "environment variable GATEWAY_WEBHOOK_SECRET")
    assert "environment variable GATEWAY_WEBHOOK_SECRET" in str(caught.value)
    assert "gateway webhooks secret" in str(caught.value)  # how to make a good one
    assert text not in str(caught.value)  # a secret is never echoed


def test_secret_boundaries_and_unpadded_base64() -> None:
    WebhookSecrets.parse(_secret(24))
    WebhookSecrets.parse(_secret(64))
    WebhookSecrets.parse(_secret(25).rstrip("="))  # padding is optional


def test_the_second_secret_of_two_is_named_when_it_is_the_bad_one() -> None:
    with pytest.raises(SecretError, match="secret 2 of 2"):
        load_secrets(f"{new_secret()} {_secret(8)}", "environment variable X")


def test_load_secrets_of_a_blank_value_is_none() -> None:
    assert load_secrets("") is None
    assert load_secrets("  \n") is None
    loaded = load_secrets(f" {new_secret()}\n{new_secret()} ")
    assert loaded is not None
    assert len(loaded) == 2


def test_the_secrets_never_show_in_a_repr() -> None:
    secret = new_secret()
    loaded = load_secrets(secret)
    assert secret.removeprefix("whsec_")[:12] not in repr(loaded)
    assert "redacted" in repr(loaded)


def test_an_id_with_a_dot_is_refused() -> None:
    # The spec: '{id}.{timestamp}.{body}' is ambiguous when the id may contain '.'.
    with pytest.raises(ValueError, match=r"no '\.'"):
        WebhookSecrets.parse(new_secret()).sign("msg.1", 1, BODY)


def test_the_cli_prints_a_fresh_secret(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["webhooks", "secret"]) == 0
    first = capsys.readouterr().out.strip()
    assert main(["webhooks", "secret"]) == 0
    second = capsys.readouterr().out.strip()
    assert first != second
    for printed in (first, second):
        WebhookSecrets.parse(printed)
        Webhook(printed)  # the reference library reads it too
