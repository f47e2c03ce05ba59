"""TLS for the upstream transports' tests: certificates made on the spot, and an https server.

``make_pki`` writes a fresh test CA (``trustme``: nothing here is trusted by the system), a
server certificate for 127.0.0.1 and localhost, one for a name no test connects to, and a
client certificate from a second CA, each as the PEM files an admin would give in
``upstreams.*.tls``. ``TLSServer`` is ``RawServer`` behind TLS, so the tests that need an https
upstream record and answer exact bytes as the plain ones do.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import trustme

from tests.support.rawserver import Handler, RawServer


@dataclass(frozen=True)
class PKI:
    ca: trustme.CA
    ca_file: Path  # the test CA, PEM
    server: trustme.LeafCert  # 127.0.0.1 and localhost, signed by ``ca``
    wrong_name: trustme.LeafCert  # wrong.example only, signed by ``ca``
    client_ca: trustme.CA  # signs the client certificate; the mTLS server trusts only it
    client_cert_file: Path
    client_key_file: Path
    other_key_file: Path  # a key that belongs to no certificate here


def make_pki(directory: Path) -> PKI:
    ca = trustme.CA()
    client_ca = trustme.CA()
    client = client_ca.issue_cert("gateway.client.test")
    stray = ca.issue_cert("stray.test")
    pki = PKI(
        ca=ca,
        ca_file=directory / "ca.pem",
        server=ca.issue_cert("127.0.0.1", "localhost"),
        wrong_name=ca.issue_cert("wrong.example"),
        client_ca=client_ca,
        client_cert_file=directory / "client.pem",
        client_key_file=directory / "client.key",
        other_key_file=directory / "other.key",
    )
    ca.cert_pem.write_to_path(str(pki.ca_file))
    client.cert_chain_pems[0].write_to_path(str(pki.client_cert_file))
    client.private_key_pem.write_to_path(str(pki.client_key_file))
    stray.private_key_pem.write_to_path(str(pki.other_key_file))
    return pki


def server_context(
    cert: trustme.LeafCert, *, client_ca: trustme.CA | None = None
) -> ssl.SSLContext:
    """A server's context presenting ``cert``; with ``client_ca`` it requires a client
    certificate signed by that CA (mTLS)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    if client_ca is not None:
        client_ca.configure_trust(context)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class TLSServer(RawServer):
    """A ``RawServer`` that speaks TLS with ``context``; ``url`` is https."""

    def __init__(self, handler: Handler, context: ssl.SSLContext) -> None:
        super().__init__(handler)
        self._context = context

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    async def __aenter__(self) -> Self:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        self.port = sock.getsockname()[1]
        self._server = await asyncio.start_server(
            self._serve, sock=sock, ssl=self._context, ssl_handshake_timeout=5
        )
        return self
