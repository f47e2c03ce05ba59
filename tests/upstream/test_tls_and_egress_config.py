"""An upstream's ``tls`` and ``proxy`` settings through the whole gateway: checked at load
with their place, and used by every target's pool (``runtime.build_runtime``).

The transports' own handling (CONNECT, absolute form, certificates) is specified in
``tests/upstream/transports/test_tunnel.py`` and ``tests/upstream/test_tls.py``; here the config
drives it.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import pytest
import trustme

from gateway.app import Gateway
from gateway.auth import hash_key
from gateway.config.errors import ConfigError
from gateway.config.loader import parse_config_text
from gateway.upstream.seam import UpstreamClient
from tests.support.connectproxy import ConnectProxy
from tests.support.rawserver import answering
from tests.support.standin import StandInUpstream, call
from tests.support.tlsorigin import TLSServer, make_pki, server_context

KEY = "sk-gw-tls-wiring"
AUTH = [("authorization", f"Bearer {KEY}")]
ANSWER = (
    b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{"ok":true}'
)


def yaml(upstream: str) -> str:
    return f"""
server: {{access_log: false}}
upstreams:
  internal:
{upstream}
routes:
  - {{name: models, path: /v1/models, methods: [GET], upstream: internal}}
keys:
  - {{name: demo, hash: {hash_key(KEY)}}}
"""


async def test_an_internal_ca_and_a_client_certificate_reach_an_mtls_upstream_through_a_proxy(
    tmp_path: Path,
) -> None:
    pki = make_pki(tmp_path)
    context = server_context(pki.server, client_ca=pki.client_ca)
    async with TLSServer(answering(ANSWER), context) as origin, ConnectProxy() as proxy:
        config = parse_config_text(
            yaml(
                f"""\
    base_url: {origin.url}/v1
    proxy: {proxy.url}
    tls:
      ca_file: {pki.ca_file}
      cert_file: {pki.client_cert_file}
      key_file: {pki.client_key_file}
"""
            ),
            env={},
        )
        app = Gateway(config)
        await app.startup()
        try:
            response = await call(app, "GET", "/v1/models", headers=AUTH)
        finally:
            await app.shutdown()
    assert response.status == 200
    assert response.body == b'{"ok":true}'
    assert proxy.connects == [f"127.0.0.1:{origin.port}"]


async def test_without_the_internal_ca_the_upstream_is_refused_with_a_502(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    async with TLSServer(answering(ANSWER), server_context(pki.server)) as origin:
        config = parse_config_text(
            yaml(f"    base_url: {origin.url}/v1\n    proxy: none\n"), env={}
        )
        app = Gateway(config)
        await app.startup()
        try:
            response = await call(app, "GET", "/v1/models", headers=AUTH)
        finally:
            await app.shutdown()
    assert response.status == 502
    assert str(pki.ca_file) not in response.body.decode()


@pytest.mark.parametrize(
    ("setting", "place", "said"),
    [
        ("tls: {ca_file: /nonexistent/ca.pem}", "upstreams.internal.tls", "ca_file"),
        ("proxy: 'http://proxy.test:notaport'", "upstreams.internal.proxy", "port"),
    ],
)
def test_a_bad_tls_file_or_proxy_is_refused_at_load_with_its_place(
    setting: str, place: str, said: str
) -> None:
    text = yaml(f"    base_url: https://vllm.internal/v1\n    {setting}\n")
    with pytest.raises(ConfigError) as refused:
        parse_config_text(text, env={})
    message = str(refused.value)
    assert place in message
    assert said in message


async def test_a_reload_makes_new_pools_when_a_tls_file_changed_in_place(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pki = make_pki(tmp_path)
    made: list[object] = []
    upstream = StandInUpstream()
    pool = upstream.factory

    def factory(**settings: Any) -> UpstreamClient:
        made.append(settings["tls"])
        return pool(**settings)

    text = yaml(f"    base_url: https://vllm.internal/v1\n    tls: {{ca_file: {pki.ca_file}}}\n")
    config = parse_config_text(text, env={})
    app = Gateway(config, client_factory=factory)
    await app.startup()
    try:
        await app.apply(parse_config_text(text, env={}))
        assert len(made) == 1  # nothing changed: the warm pool stays
        other = trustme.CA()
        other.cert_pem.write_to_path(str(pki.ca_file))  # rotated in place, same path
        os.utime(pki.ca_file, ns=(time.time_ns(), time.time_ns() + 1_000_000))
        await app.apply(parse_config_text(text, env={}))
        assert len(made) == 2  # read again: a new context, new pools
        unverified = yaml("    base_url: https://vllm.internal/v1\n    tls: {verify: false}\n")
        await app.apply(parse_config_text(unverified, env={}))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="gateway.upstream.tls"):
            await app.apply(parse_config_text(unverified, env={}))
        assert any("TLS verification is OFF" in r.getMessage() for r in caplog.records)
    finally:
        await app.shutdown()
