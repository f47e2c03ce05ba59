"""Every upstream client (``gateway.app.CLIENTS``) through an egress proxy, on the wire.

A real forward proxy runs in the test's loop (``tests/support/connectproxy.py``) in front of a
real upstream: an https one with certificates from a test CA (``tests/support/tlsorigin.py``)
or a plain ``RawServer``. The proxy's settings go through ``proxy_for`` as the gateway's would,
so these cases also show that what it returns drives both clients the same way.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import pytest
import uvloop

from gateway.app import CLIENTS
from gateway.config.resilience import UpstreamTLS
from gateway.upstream.egress import EgressProxy, proxy_for
from gateway.upstream.seam import (
    UpstreamClient,
    UpstreamConnectError,
    UpstreamTimeout,
)
from gateway.upstream.tls import client_ssl_context
from gateway.upstream.transports.tunnel import connect_request
from tests.support.connectproxy import ConnectProxy
from tests.support.outbound import fetch, get, outbound, read_all
from tests.support.rawserver import RawConnection, RawServer, answer_each
from tests.support.tlsorigin import PKI, TLSServer, make_pki, server_context

MakeClient = Callable[[EgressProxy | None], UpstreamClient]

USER, PASSWORD = "gateway", "s3cret:p@ss"
# The userinfo as it stands in the proxy URL: percent-encoded (RFC 3986 §3.2.1).
USERINFO = "gateway:s3cret%3Ap%40ss"
BASIC = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def trusting(pki: PKI) -> ssl.SSLContext:
    """The client's context for an upstream whose tls.ca_file is the test CA."""
    context = client_ssl_context(UpstreamTLS(ca_file=str(pki.ca_file)))
    assert context is not None
    return context


@pytest.fixture(params=sorted(CLIENTS))
def transport(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
async def make_client(transport: str, trusting: ssl.SSLContext) -> AsyncIterator[MakeClient]:
    """Clients that trust the test CA, closed at the end of the test."""
    made: list[UpstreamClient] = []

    def make(proxy: EgressProxy | None) -> UpstreamClient:
        client = CLIENTS[transport](max_connections=10, tls=trusting, proxy=proxy)
        made.append(client)
        return client

    yield make
    for client in made:
        await client.aclose()
    for _ in range(3):
        await asyncio.sleep(0)  # aborted transports close their sockets on the next iteration


def through(proxy_url: str, target_url: str) -> EgressProxy | None:
    """The proxy an upstream with ``proxy: <proxy_url>`` uses for ``target_url``."""
    return proxy_for(target_url, proxy_url, {})


def https_origin(pki: PKI) -> TLSServer:
    return TLSServer(answer_each, server_context(pki.server))


# -- https targets: CONNECT, then TLS end to end ------------------------------------------------


async def test_an_https_target_is_reached_through_a_connect_tunnel_with_tls_end_to_end(
    make_client: MakeClient, pki: PKI
) -> None:
    async with https_origin(pki) as origin, ConnectProxy() as proxy:
        client = make_client(through(proxy.url, origin.url))
        request = outbound("GET", origin.url + "/v1/models", headers=[("authorization", "sk-1")])
        response, body = await fetch(client, request)
    assert (response.status, body) == (200, b"ok")
    assert proxy.connects == [f"127.0.0.1:{origin.port}"]
    # The upstream got the request in origin-form, over TLS it terminated itself.
    assert origin.connections[0].requests[0].startswith(b"GET /v1/models HTTP/1.1\r\n")
    # The proxy carried bytes it could not read: no request line, no key.
    assert proxy.tunnelled
    assert b"/v1/models" not in proxy.tunnelled
    assert b"sk-1" not in proxy.tunnelled


async def test_one_tunnel_carries_many_requests_as_a_pooled_connection(
    make_client: MakeClient, pki: PKI
) -> None:
    async with https_origin(pki) as origin, ConnectProxy() as proxy:
        client = make_client(through(proxy.url, origin.url))
        for path in ("/a", "/b", "/c"):
            _, body = await fetch(client, get(origin.url + path))
            assert body == b"ok"
    assert len(proxy.connects) == 1
    assert len(origin.connections) == 1
    assert len(origin.connections[0].requests) == 3


async def test_the_proxy_gets_its_credentials_with_connect(
    make_client: MakeClient, pki: PKI
) -> None:
    async with https_origin(pki) as origin, ConnectProxy(credentials=BASIC) as proxy:
        client = make_client(through(proxy.url_with(USERINFO), origin.url))
        _, body = await fetch(client, get(origin.url + "/"))
    assert body == b"ok"
    assert proxy.authorizations == [BASIC]
    # Never past the proxy: the upstream's request carries no proxy credentials.
    assert b"proxy-authorization" not in origin.connections[0].requests[0].lower()


def test_the_connect_request_names_the_target_in_authority_form_with_host() -> None:
    assert connect_request("api.example", 443, None) == (
        b"CONNECT api.example:443 HTTP/1.1\r\nhost: api.example:443\r\n\r\n"
    )
    assert connect_request("::1", 8443, "Basic eA==") == (
        b"CONNECT [::1]:8443 HTTP/1.1\r\nhost: [::1]:8443\r\n"
        b"proxy-authorization: Basic eA==\r\n\r\n"
    )


@pytest.mark.parametrize("scheme", ["https", "http"])
async def test_a_proxy_answering_407_is_a_connect_error_that_names_no_credential(
    make_client: MakeClient, pki: PKI, scheme: str
) -> None:
    wrong = "gateway:wrong-password-0123"
    async with (
        https_origin(pki) as tls_origin,
        RawServer(answer_each) as plain_origin,
        ConnectProxy(credentials=BASIC) as proxy,
    ):
        origin_url = tls_origin.url if scheme == "https" else plain_origin.url
        egress = through(proxy.url_with(wrong), origin_url)
        assert egress is not None
        assert egress.authorization is not None
        with pytest.raises(UpstreamConnectError) as caught:
            await make_client(egress).send(get(origin_url + "/v1/models"))
    message = str(caught.value)
    assert "407" in message
    for secret in ("wrong-password-0123", egress.authorization, egress.authorization[6:]):
        assert secret not in message
    assert tls_origin.connections == []
    assert plain_origin.connections == []


async def test_a_proxy_that_cannot_reach_the_target_is_a_connect_error_naming_its_status(
    make_client: MakeClient, pki: PKI
) -> None:
    async with ConnectProxy() as proxy:
        nowhere = "https://127.0.0.1:1"  # nothing listens on port 1
        with pytest.raises(UpstreamConnectError, match="502"):
            await make_client(through(proxy.url, nowhere)).send(get(nowhere + "/"))
    assert proxy.connects == ["127.0.0.1:1"]


async def test_tls_through_the_tunnel_checks_the_targets_certificate_not_the_proxys(
    transport: str, pki: PKI
) -> None:
    # The system's CAs do not know the test CA: the handshake with the upstream must fail
    # although the proxy said 200.
    async with https_origin(pki) as origin, ConnectProxy() as proxy:
        client = CLIENTS[transport](max_connections=1, proxy=through(proxy.url, origin.url))
        try:
            with pytest.raises(UpstreamConnectError):
                await client.send(get(origin.url + "/"))
        finally:
            await client.aclose()
    assert proxy.connects == [f"127.0.0.1:{origin.port}"]
    assert all(connection.requests == [] for connection in origin.connections)


async def test_the_connect_timeout_covers_a_proxy_that_never_answers_connect(
    make_client: MakeClient, pki: PKI
) -> None:
    async def silent(connection: RawConnection) -> None:
        await connection.wait_eof()

    async with https_origin(pki) as origin, RawServer(silent) as proxy:
        client = make_client(through(proxy.url, origin.url))
        started = asyncio.get_running_loop().time()
        with pytest.raises(UpstreamTimeout):
            await client.send(get(origin.url + "/", connect=0.2))
        assert asyncio.get_running_loop().time() - started < 1.5
        # The client gave the connection up: the proxy sees it end, long before the server stops.
        await asyncio.wait_for(proxy.connections[0].finished.wait(), 1.0)


async def test_a_stream_through_the_tunnel_is_handed_over_as_each_chunk_arrives(
    make_client: MakeClient, pki: PKI
) -> None:
    first_taken = asyncio.Event()

    async def streaming(connection: RawConnection) -> None:
        await connection.read_request()
        connection.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        connection.write(b"f\r\ndata: first...\n\r\n")
        # The second chunk is sent only once the client holds the first: a client that waited
        # for more (or for the end) would time out here instead.
        await first_taken.wait()
        connection.write(b"b\r\ndata: last\n\r\n0\r\n\r\n")
        await answer_each(connection)

    async with (
        TLSServer(streaming, server_context(pki.server)) as origin,
        ConnectProxy() as proxy,
    ):
        client = make_client(through(proxy.url, origin.url))
        response = await client.send(get(origin.url + "/stream", read=2.0))
        assert await response.read_chunk() == b"data: first...\n"
        first_taken.set()
        assert await read_all(response) == b"data: last\n"
        response.release()
    assert len(proxy.connects) == 1


# What only the http1 client guarantees about a proxy that does not tunnel: each answer is a
# connect error that says what was wrong. (aiohttp reports the odd ones as protocol errors, or
# waits for a TLS handshake after junk; both are 502s to the gateway's client.)
BAD_CONNECT_ANSWERS = [
    ("not HTTP", b"SSH-2.0-OpenSSH_9.6\r\n\r\n", "not HTTP/1.x"),
    ("a head too long", b"HTTP/1.1 200 OK\r\nx: " + b"a" * 20000 + b"\r\n\r\n", "too long"),
    ("a head without end", b"HTTP/1.1 200 OK\r\nx: " + b"a" * 20000, "too long"),
    ("closed at once", b"", "closed the connection"),
    ("bytes after a 200", b"HTTP/1.1 200 OK\r\n\r\n\x16\x03", "bytes after"),
    (
        "a 407 with a body",
        b"HTTP/1.1 407 Who are you\r\ncontent-length: 5\r\n\r\nnope!",
        "407 Proxy Authentication Required",
    ),
]


@pytest.mark.parametrize(
    ("case", "answer", "reason"), BAD_CONNECT_ANSWERS, ids=[c for c, *_ in BAD_CONNECT_ANSWERS]
)
async def test_http1_names_what_was_wrong_with_the_proxys_answer_to_connect(
    trusting: ssl.SSLContext, case: str, answer: bytes, reason: str
) -> None:
    async def proxy_answering(connection: RawConnection) -> None:
        await connection.read_request()
        connection.write(answer)
        if answer:
            await connection.wait_eof()

    async with RawServer(proxy_answering) as proxy:
        target = "https://127.0.0.1:1/v1/models"  # never reached
        client = CLIENTS["http1"](max_connections=1, tls=trusting, proxy=through(proxy.url, target))
        try:
            with pytest.raises(UpstreamConnectError, match=reason):
                await client.send(get(target, connect=1.0))
        finally:
            await client.aclose()
        # Nothing stays open: the pool gave the connection up.
        await asyncio.wait_for(proxy.connections[0].finished.wait(), 1.0)


# -- http targets: absolute-form to the proxy ---------------------------------------------------


async def test_an_http_target_is_sent_to_the_proxy_in_absolute_form_with_its_credentials(
    make_client: MakeClient,
) -> None:
    async with RawServer(answer_each) as origin, ConnectProxy(credentials=BASIC) as proxy:
        client = make_client(through(proxy.url_with(USERINFO), origin.url))
        target = "/v1/chat%2Fcompletions?api-version=1&q=a%20b"
        _, body = await fetch(client, outbound("POST", origin.url + target, body=b"{}"))
        _, again = await fetch(client, get(origin.url + "/v1/models"))
    assert (body, again) == (b"ok", b"ok")
    authority = f"127.0.0.1:{origin.port}"
    assert proxy.absolute_lines == [
        f"POST http://{authority}{target} HTTP/1.1",
        f"GET http://{authority}/v1/models HTTP/1.1",
    ]
    assert proxy.authorizations == [BASIC, BASIC]
    assert proxy.connects == []
    assert proxy.connections == 1  # the connection to the proxy was kept and reused
    (connection,) = origin.connections
    first = connection.requests[0]
    assert first.startswith(f"POST {target} HTTP/1.1\r\n".encode())
    assert f"\r\nhost: {authority}\r\n".encode() in first.lower()  # RFC 9112 §3.2.2: Host kept


async def test_without_credentials_no_proxy_authorization_is_sent(
    make_client: MakeClient,
) -> None:
    async with RawServer(answer_each) as origin, ConnectProxy() as proxy:
        await fetch(make_client(through(proxy.url, origin.url)), get(origin.url + "/"))
    assert proxy.authorizations == [None]


# -- Which connections take the proxy -----------------------------------------------------------


async def test_a_no_proxy_host_bypasses_the_proxy_from_the_environment(
    make_client: MakeClient, pki: PKI
) -> None:
    async with https_origin(pki) as origin, ConnectProxy() as proxy:
        proxied = proxy_for(origin.url, "env", {"HTTPS_PROXY": proxy.url})
        direct = proxy_for(
            origin.url, "env", {"HTTPS_PROXY": proxy.url, "NO_PROXY": "example.com,127.0.0.1"}
        )
        assert direct is None
        assert proxied is not None
        await fetch(make_client(direct), get(origin.url + "/direct"))
        assert proxy.connections == 0
        await fetch(make_client(proxied), get(origin.url + "/proxied"))
    assert proxy.connects == [f"127.0.0.1:{origin.port}"]
    assert len(origin.connections) == 2


# -- The loop the gateway serves on --------------------------------------------------------------


def run_on_uvloop(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())


def test_a_tunnel_and_absolute_form_work_on_uvloop_too(transport: str, pki: PKI) -> None:
    # `gateway serve` runs uvicorn on uvloop, whose start_tls is its own implementation.
    async def main() -> None:
        context = client_ssl_context(UpstreamTLS(ca_file=str(pki.ca_file)))
        async with (
            https_origin(pki) as tls_origin,
            RawServer(answer_each) as plain_origin,
            ConnectProxy(credentials=BASIC) as proxy,
        ):
            for origin_url in (tls_origin.url, plain_origin.url):
                egress = through(proxy.url_with(USERINFO), origin_url)
                client = CLIENTS[transport](max_connections=2, tls=context, proxy=egress)
                try:
                    for _ in range(2):
                        _, body = await fetch(client, get(origin_url + "/"))
                        assert body == b"ok"
                finally:
                    await client.aclose()
        assert proxy.connects == [f"127.0.0.1:{tls_origin.port}"]
        assert len(proxy.absolute_lines) == 2

    run_on_uvloop(main)
