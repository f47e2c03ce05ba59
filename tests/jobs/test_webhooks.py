"""One webhook attempt against a real receiver: signatures, answers, timeouts, SSRF.

The receiver verifies every request with the reference ``standardwebhooks`` library; the
sender is the gateway's, with its real session, resolver and connector.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from email.utils import formatdate

import pytest

from gateway.jobs.hosts import WebhookHosts
from gateway.jobs.signing import WebhookSecrets, new_secret, verify
from gateway.jobs.webhooks import (
    MAX_RESPONSE_BYTES,
    USER_AGENT,
    WebhookSender,
    next_delay,
    parse_retry_after,
)
from tests.support.ports import free_port
from tests.support.webhookreceiver import Reply, WebhookReceiver

BODY = b'{"type":"job.completed","timestamp":1,"data":{"id":"job_abc"}}'
SECRET = new_secret()


@pytest.fixture
async def receiver() -> AsyncIterator[WebhookReceiver]:
    async with WebhookReceiver([SECRET]) as started:
        yield started


@pytest.fixture
async def sender() -> AsyncIterator[WebhookSender]:
    made = WebhookSender(WebhookSecrets.parse(SECRET), 2.0)
    await made.start()
    yield made
    await made.aclose()


def local(receiver: WebhookReceiver) -> WebhookHosts:
    """The key's rule for the test receiver: its address and port, named exactly."""
    return WebhookHosts.parse([f"127.0.0.1:{receiver.port}"])


async def test_a_delivery_verifies_with_the_standard_webhooks_library(
    receiver: WebhookReceiver, sender: WebhookSender
) -> None:
    before = time.time()
    attempt = await sender.send(receiver.url(), local(receiver), "msg_job_abc", BODY)
    assert attempt.ok
    assert attempt.final  # a success ends the schedule
    assert attempt.status == 200
    assert attempt.error is None
    (request,) = receiver.received
    assert request.verified_with == (SECRET,), request.complaint
    assert request.method == "POST"
    assert request.path == "/hook"
    assert request.body == BODY
    assert request.headers["webhook-id"] == "msg_job_abc"
    assert before - 1 <= int(request.headers["webhook-timestamp"]) <= time.time()
    assert request.headers["content-type"] == "application/json"
    assert request.headers["user-agent"] == USER_AGENT
    assert USER_AGENT.startswith("llm-gateway/")
    # The gateway's own verify() agrees with the library.
    assert verify(SECRET, request.headers, request.body) == "msg_job_abc"
    assert SECRET not in str(request.headers)  # the secret itself never travels


async def test_rotation_signs_with_every_secret() -> None:
    new, old = new_secret(), new_secret()
    async with WebhookReceiver([new, old]) as receiver:
        sender = WebhookSender(WebhookSecrets.parse(f"{new} {old}"), 2.0)
        try:
            attempt = await sender.send(receiver.url(), local(receiver), "msg_job_r", BODY)
        finally:
            await sender.aclose()
    assert attempt.ok
    (request,) = receiver.received
    assert len(request.headers["webhook-signature"].split(" ")) == 2
    # A receiver still on the old secret and one already on the new both verify.
    assert request.verified_with == (new, old)


async def test_each_attempt_has_its_own_timestamp_and_the_same_id(
    receiver: WebhookReceiver,
) -> None:
    clock = [1_000_000.0]
    sender = WebhookSender(WebhookSecrets.parse(SECRET), 2.0, clock=lambda: clock[0])
    try:
        await sender.send(receiver.url(), local(receiver), "msg_job_t", BODY)
        clock[0] += 5
        await sender.send(receiver.url(), local(receiver), "msg_job_t", BODY)
    finally:
        await sender.aclose()
    first, second = receiver.received
    assert first.headers["webhook-id"] == second.headers["webhook-id"] == "msg_job_t"
    assert first.headers["webhook-timestamp"] == "1000000"
    assert second.headers["webhook-timestamp"] == "1000005"
    assert first.headers["webhook-signature"] != second.headers["webhook-signature"]


async def test_statuses_say_what_comes_next(
    receiver: WebhookReceiver, sender: WebhookSender
) -> None:
    receiver.script(
        Reply(204), Reply(410), Reply(500), Reply(404), Reply(429, {"Retry-After": "7"})
    )
    hosts = local(receiver)
    no_content, gone, error, missing, limited = [
        await sender.send(receiver.url(), hosts, "msg_job_s", BODY) for _ in range(5)
    ]
    assert no_content.ok
    assert no_content.final
    assert gone.status == 410
    assert gone.gone
    assert gone.final
    assert not gone.ok
    assert error.status == 500
    assert not error.final
    assert error.error is None
    assert missing.status == 404
    assert not missing.final
    assert limited.status == 429
    assert limited.retry_after == 7.0
    assert not limited.final


async def test_a_timeout_is_a_failed_attempt(receiver: WebhookReceiver) -> None:
    receiver.script(Reply(200, delay=3.0))
    sender = WebhookSender(WebhookSecrets.parse(SECRET), 0.3)
    try:
        attempt = await sender.send(receiver.url(), local(receiver), "msg_job_slow", BODY)
    finally:
        await sender.aclose()
    assert attempt.status is None
    assert not attempt.final
    assert attempt.error == "no answer within 0.3 s"
    assert 250 <= attempt.duration_ms < 1500


async def test_redirects_are_not_followed(receiver: WebhookReceiver, sender: WebhookSender) -> None:
    for status in (301, 302, 307, 308):
        receiver.script(Reply(status, {"Location": receiver.url("/elsewhere")}))
        attempt = await sender.send(receiver.url(), local(receiver), "msg_job_3xx", BODY)
        assert attempt.status == status
        assert not attempt.ok
        assert not attempt.final
        assert attempt.error is not None
        assert "redirects are not followed" in attempt.error
    assert [request.path for request in receiver.received] == ["/hook"] * 4


async def test_a_large_answer_is_read_capped_and_dropped(
    receiver: WebhookReceiver, sender: WebhookSender
) -> None:
    receiver.script(Reply(200, body=b"x" * (MAX_RESPONSE_BYTES * 16)))
    attempt = await sender.send(receiver.url(), local(receiver), "msg_job_big", BODY)
    assert attempt.ok


async def test_a_closed_port_is_a_failed_attempt_without_the_query(
    sender: WebhookSender,
) -> None:
    port = free_port()
    hosts = WebhookHosts.parse([f"127.0.0.1:{port}"])
    attempt = await sender.send(
        f"http://127.0.0.1:{port}/hook?token=s3cret#frag", hosts, "msg_job_c", BODY
    )
    assert attempt.status is None
    assert not attempt.final
    assert attempt.error is not None
    assert "cannot connect" in attempt.error
    assert "s3cret" not in attempt.error
    assert "frag" not in attempt.error


# -- SSRF: nothing reaches the receiver --------------------------------------------------------


async def test_the_metadata_address_is_refused(sender: WebhookSender) -> None:
    attempt = await sender.send(
        "https://169.254.169.254/latest/meta-data/", WebhookHosts.parse(["*"]), "msg_j", BODY
    )
    assert attempt.refused
    assert attempt.final
    assert attempt.status is None
    assert attempt.error is not None
    assert "cloud metadata" in attempt.error
    assert attempt.duration_ms < 100  # refused before any connection


async def test_loopback_through_star_is_refused(
    receiver: WebhookReceiver, sender: WebhookSender
) -> None:
    for entries in (["*"], ["*", "*.example.com"]):
        url = f"https://127.0.0.1:{receiver.port}/hook"
        attempt = await sender.send(url, WebhookHosts.parse(entries), "msg_j", BODY)
        assert attempt.refused
        assert attempt.error is not None
        assert "loopback" in attempt.error
    assert receiver.received == []


async def test_a_name_resolving_to_loopback_is_refused(
    receiver: WebhookReceiver, sender: WebhookSender
) -> None:
    # 'localhost' passes the URL check ('*' allows any name); its addresses are what refuse it,
    # checked by the resolver before any connection.
    hosts = WebhookHosts.parse(["*"])
    url = f"https://localhost:{receiver.port}/hook"
    assert hosts.check_url(url) is None
    attempt = await sender.send(url, hosts, "msg_j", BODY)
    assert attempt.status is None
    assert attempt.error is not None
    assert "localhost resolves to" in attempt.error
    assert "loopback" in attempt.error
    assert "Traceback" not in attempt.error
    assert receiver.received == []


async def test_an_ipv4_mapped_ipv6_loopback_is_refused(
    receiver: WebhookReceiver, sender: WebhookSender
) -> None:
    url = f"http://[::ffff:127.0.0.1]:{receiver.port}/hook"
    for entries in (["*"], [f"*:{receiver.port}"]):
        attempt = await sender.send(url, WebhookHosts.parse(entries), "msg_j", BODY)
        assert attempt.refused
        assert attempt.error is not None
    https = f"https://[::ffff:127.0.0.1]:{receiver.port}/hook"
    attempt = await sender.send(https, WebhookHosts.parse(["*"]), "msg_j", BODY)
    assert attempt.error is not None
    assert "loopback address in an IPv6 form" in attempt.error
    assert receiver.received == []


async def test_an_explicitly_listed_address_is_allowed(
    receiver: WebhookReceiver, sender: WebhookSender
) -> None:
    for entries in (["127.0.0.1"], [f"127.0.0.1:{receiver.port}"], ["*", "127.0.0.1"]):
        attempt = await sender.send(receiver.url(), WebhookHosts.parse(entries), "msg_j", BODY)
        assert attempt.ok, attempt.error
    # A name listed exactly may resolve to an internal address: the admin named it.
    named = WebhookHosts.parse([f"localhost:{receiver.port}"])
    url = f"http://localhost:{receiver.port}/hook"
    attempt = await sender.send(url, named, "msg_j", BODY)
    assert attempt.ok, attempt.error
    assert len(receiver.received) == 4


async def test_one_keys_allowance_does_not_carry_to_another(
    receiver: WebhookReceiver, sender: WebhookSender
) -> None:
    # Key A lists localhost; key B has '*'. B's delivery to the same host and port right after
    # A's must still be refused: no kept-alive connection and no cached DNS answer is shared.
    port = receiver.port
    a = await sender.send(
        f"http://localhost:{port}/hook", WebhookHosts.parse([f"localhost:{port}"]), "msg_a", BODY
    )
    b = await sender.send(
        f"https://localhost:{port}/hook", WebhookHosts.parse(["*"]), "msg_b", BODY
    )
    assert a.ok
    assert b.error is not None
    assert "loopback" in b.error
    assert len(receiver.received) == 1


async def test_plain_http_only_to_hosts_named_exactly(
    receiver: WebhookReceiver, sender: WebhookSender
) -> None:
    for entries in (["*"], ["127.0.0.0/8"]):
        attempt = await sender.send(receiver.url(), WebhookHosts.parse(entries), "msg_j", BODY)
        assert attempt.refused
        assert attempt.error is not None
        assert "plain http" in attempt.error
    assert receiver.received == []


async def test_webhooks_off_for_the_key(receiver: WebhookReceiver, sender: WebhookSender) -> None:
    attempt = await sender.send(receiver.url(), WebhookHosts.parse([]), "msg_j", BODY)
    assert attempt.refused
    assert attempt.error is not None
    assert "off" in attempt.error
    assert receiver.received == []


# -- when the next attempt is due --------------------------------------------------------------


def test_retry_after_reads_seconds_and_http_dates() -> None:
    now = 1_700_000_000.0
    assert parse_retry_after("120", now) == 120.0
    assert parse_retry_after(" 0 ", now) == 0.0
    assert parse_retry_after(formatdate(now + 90, usegmt=True), now) == pytest.approx(90)
    assert parse_retry_after(formatdate(now - 90, usegmt=True), now) == 0.0  # past: at once
    assert parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", now) == 0.0  # RFC 9110's example
    for bad in (None, "", "soon", "-5", "1.5", "Sun, 99 Nov 1994 08:49:37 GMT"):
        assert parse_retry_after(bad, now) is None


def test_next_delay_follows_the_schedule_with_jitter() -> None:
    schedule = (0.0, 5.0, 300.0)
    assert next_delay(schedule, 1, None, 0.0) == 5.0
    assert next_delay(schedule, 1, None, 1.0) == pytest.approx(5.5)  # at most 10% more
    assert next_delay(schedule, 2, None, 0.5) == pytest.approx(315.0)
    assert next_delay(schedule, 3, None, 0.0) is None  # ran out


def test_retry_after_moves_the_next_attempt_later_never_sooner() -> None:
    schedule = (0.0, 5.0, 300.0)
    assert next_delay(schedule, 1, 60.0, 0.0) == 60.0
    assert next_delay(schedule, 1, 1.0, 0.0) == 5.0  # sooner than the schedule: ignored
    assert next_delay(schedule, 1, 86400.0 * 30, 0.0) == 300.0  # capped at the longest step
    assert next_delay(schedule, 3, 60.0, 0.0) is None  # it does not extend the schedule
