"""An upstream's ``tls`` settings (``gateway/upstream/tls.py``), against real TLS servers.

Certificates come from test CAs made on the spot (``tests/support/tlsorigin.py``), which no
system trusts; every connection case runs once per upstream client (``gateway.app.CLIENTS``),
through the seam, with the context ``client_ssl_context`` builds from the settings.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from gateway.app import CLIENTS
from gateway.config.resilience import UpstreamTLS
from gateway.upstream.seam import UpstreamClient, UpstreamConnectError, UpstreamProtocolError
from gateway.upstream.tls import client_ssl_context, tls_problem
from tests.support.outbound import fetch, get
from tests.support.rawserver import RawConnection, answer_each
from tests.support.tlsorigin import PKI, TLSServer, make_pki, server_context

MakeClient = Callable[[ssl.SSLContext | None], UpstreamClient]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(params=sorted(CLIENTS))
async def make_client(request: pytest.FixtureRequest) -> AsyncIterator[MakeClient]:
    """Clients of each kind, closed at the end of the test."""
    factory = CLIENTS[request.param]
    made: list[UpstreamClient] = []

    def make(tls: ssl.SSLContext | None) -> UpstreamClient:
        client = factory(max_connections=2, tls=tls)
        made.append(client)
        return client

    yield make
    for client in made:
        await client.aclose()
    for _ in range(3):
        await asyncio.sleep(0)  # aborted transports close their sockets on the next iteration


def context(tls: UpstreamTLS) -> ssl.SSLContext:
    built = client_ssl_context(tls, upstream="internal")
    assert built is not None
    return built


# -- Whom the gateway trusts ---------------------------------------------------------------------


def test_an_upstream_with_default_tls_gets_no_context_of_its_own() -> None:
    # The transport keeps its own default context, built once, for every such upstream.
    assert client_ssl_context(UpstreamTLS()) is None


async def test_the_system_cas_refuse_an_upstream_signed_by_a_private_ca(
    make_client: MakeClient, pki: PKI
) -> None:
    async with TLSServer(answer_each, server_context(pki.server)) as server:
        with pytest.raises(UpstreamConnectError):
            await make_client(None).send(get(server.url + "/"))
    assert all(connection.requests == [] for connection in server.connections)


async def test_ca_file_makes_the_upstreams_private_ca_trusted(
    make_client: MakeClient, pki: PKI
) -> None:
    async with TLSServer(answer_each, server_context(pki.server)) as server:
        client = make_client(context(UpstreamTLS(ca_file=str(pki.ca_file))))
        response, body = await fetch(client, get(server.url + "/v1/models"))
    assert (response.status, body) == (200, b"ok")


def test_ca_file_replaces_the_system_cas_and_keeps_the_name_check(pki: PKI) -> None:
    built = context(UpstreamTLS(ca_file=str(pki.ca_file)))
    assert len(built.get_ca_certs()) == 1
    assert built.check_hostname
    assert built.verify_mode == ssl.CERT_REQUIRED


def test_a_relative_path_is_read_from_the_working_directory(
    pki: PKI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    relative = UpstreamTLS(ca_file=pki.ca_file.name)
    monkeypatch.chdir(pki.ca_file.parent)
    assert tls_problem(relative) is None
    assert client_ssl_context(relative) is not None
    monkeypatch.chdir(tmp_path)
    assert tls_problem(relative) == (
        "ca_file ca.pem: no such file (relative paths start at the working directory)"
    )


# -- mTLS: who the gateway is --------------------------------------------------------------------


async def test_an_upstream_that_requires_a_client_certificate_refuses_a_client_without_one(
    make_client: MakeClient, pki: PKI
) -> None:
    server_side = server_context(pki.server, client_ca=pki.client_ca)
    async with TLSServer(answer_each, server_side) as server:
        client = make_client(context(UpstreamTLS(ca_file=str(pki.ca_file))))
        # TLS 1.3 tells the client after its side of the handshake is done: the failure shows
        # when the connection is used, as a connection closed before any answer.
        with pytest.raises((UpstreamConnectError, UpstreamProtocolError)):
            await client.send(get(server.url + "/"))
    assert server.connections == []  # the server never got as far as reading a request


async def test_cert_file_and_key_file_present_the_client_certificate(
    make_client: MakeClient, pki: PKI
) -> None:
    peers: list[object] = []

    async def recording(connection: RawConnection) -> None:
        peers.append(connection.writer.get_extra_info("peercert"))
        await answer_each(connection)

    server_side = server_context(pki.server, client_ca=pki.client_ca)
    tls = UpstreamTLS(
        ca_file=str(pki.ca_file),
        cert_file=str(pki.client_cert_file),
        key_file=str(pki.client_key_file),
    )
    async with TLSServer(recording, server_side) as server:
        _, body = await fetch(make_client(context(tls)), get(server.url + "/"))
    assert body == b"ok"
    (peer,) = peers
    assert isinstance(peer, dict)
    assert peer["subjectAltName"] == (("DNS", "gateway.client.test"),)


# -- verify: false -------------------------------------------------------------------------------


async def test_verify_false_connects_to_a_certificate_for_another_name_and_warns_loudly(
    make_client: MakeClient, pki: PKI, caplog: pytest.LogCaptureFixture
) -> None:
    async with TLSServer(answer_each, server_context(pki.wrong_name)) as server:
        # The name really is wrong: trusting its CA is not enough.
        checked = make_client(context(UpstreamTLS(ca_file=str(pki.ca_file))))
        with pytest.raises(UpstreamConnectError):
            await checked.send(get(server.url + "/"))
        assert [r for r in caplog.records if r.name == "gateway.upstream.tls"] == []
        with caplog.at_level(logging.WARNING, logger="gateway.upstream.tls"):
            unchecked = context(UpstreamTLS(verify=False))  # not even the CA is known
        _, body = await fetch(make_client(unchecked), get(server.url + "/"))
    assert body == b"ok"
    (record,) = [r for r in caplog.records if r.name == "gateway.upstream.tls"]
    assert record.levelno == logging.WARNING
    message = record.getMessage()
    assert "'internal'" in message
    assert "NOT checked" in message
    assert "API keys" in message


# -- The config checks' messages -----------------------------------------------------------------


def _encrypted_key(pki: PKI, directory: Path, legacy: bool) -> Path:
    key = serialization.load_pem_private_key(pki.client_key_file.read_bytes(), password=None)
    encoding = serialization.PrivateFormat.TraditionalOpenSSL if legacy else None
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        encoding or serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase"),
    )
    path = directory / ("legacy.key" if legacy else "pkcs8.key")
    path.write_bytes(pem)
    return path


def test_a_usable_configuration_has_no_problem(pki: PKI) -> None:
    tls = UpstreamTLS(
        ca_file=str(pki.ca_file),
        cert_file=str(pki.client_cert_file),
        key_file=str(pki.client_key_file),
    )
    assert tls_problem(tls) is None
    assert tls_problem(UpstreamTLS()) is None
    assert tls_problem(UpstreamTLS(verify=False)) is None


PROBLEMS = [
    ("missing ca_file", "ca_file {missing}: no such file"),
    ("ca_file is a directory", "ca_file {dir}: is a directory, not a file"),
    ("ca_file is not PEM", "ca_file {text}: not a PEM file holding certificates"),
    ("ca_file is broken PEM", "ca_file {broken}: not a PEM file of CA certificates"),
    ("cert_file is a key", "cert_file {key}: not a PEM file holding a certificate"),
    ("key_file is a certificate", "key_file {cert}: not a PEM file holding a private key"),
    ("missing key_file", "key_file {missing}: no such file"),
    ("key of another certificate", "key_file {other}: the key does not belong to the "),
    ("encrypted key, PKCS #8", "key_file {pkcs8}: the key is encrypted"),
    ("encrypted key, legacy", "key_file {legacy}: the key is encrypted"),
]


@pytest.mark.parametrize(("case", "expected"), PROBLEMS, ids=[case for case, _ in PROBLEMS])
def test_each_unusable_file_is_named_with_what_is_wrong_and_none_of_its_content(
    pki: PKI, tmp_path: Path, case: str, expected: str
) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not a certificate\n")
    broken = tmp_path / "broken.pem"
    broken.write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n")
    paths = {
        "missing": str(tmp_path / "missing.pem"),
        "dir": str(tmp_path),
        "text": str(text),
        "broken": str(broken),
        "key": str(pki.client_key_file),
        "cert": str(pki.client_cert_file),
        "other": str(pki.other_key_file),
        "pkcs8": str(_encrypted_key(pki, tmp_path, legacy=False)),
        "legacy": str(_encrypted_key(pki, tmp_path, legacy=True)),
    }
    pair = {"cert_file": str(pki.client_cert_file), "key_file": str(pki.client_key_file)}
    settings: dict[str, str] = {
        "missing ca_file": {"ca_file": paths["missing"]},
        "ca_file is a directory": {"ca_file": paths["dir"]},
        "ca_file is not PEM": {"ca_file": paths["text"]},
        "ca_file is broken PEM": {"ca_file": paths["broken"]},
        "cert_file is a key": {**pair, "cert_file": paths["key"]},
        "key_file is a certificate": {**pair, "key_file": paths["cert"]},
        "missing key_file": {**pair, "key_file": paths["missing"]},
        "key of another certificate": {**pair, "key_file": paths["other"]},
        "encrypted key, PKCS #8": {**pair, "key_file": paths["pkcs8"]},
        "encrypted key, legacy": {**pair, "key_file": paths["legacy"]},
    }[case]
    tls = UpstreamTLS.model_validate(settings)
    problem = tls_problem(tls)
    assert problem is not None
    assert problem.startswith(expected.format(**paths)), problem
    assert "-----" not in problem  # no PEM content, no key material
    # The same message when the gateway builds the context without checking first, and no
    # passphrase prompt on the terminal for an encrypted key.
    with pytest.raises(ValueError, match=f"^{re.escape(problem)}$"):
        client_ssl_context(tls)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_file_is_named(pki: PKI, tmp_path: Path) -> None:
    locked = tmp_path / "locked.pem"
    locked.write_bytes(pki.ca_file.read_bytes())
    locked.chmod(0)
    assert tls_problem(UpstreamTLS(ca_file=str(locked))) == (
        f"ca_file {locked}: cannot be read (permission denied)"
    )
