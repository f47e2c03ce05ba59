"""Masking the upstream's secrets in a non-streamed error body, as a specification of the
relay's helpers; end to end in ``tests/end_to_end/test_hostile_upstream.py``."""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Callable

import pytest

from gateway.http.decoding import inflated_body
from gateway.pipeline.held_bodies import ERROR_BODY_BYTES, masked_error_body
from gateway.types import RawHeaders

KEY = b"sk-upstream-0123456789"
SECRETS = (KEY,)
ERROR = b'{"error": {"message": "Incorrect API key provided: Bearer ' + KEY + b'"}}'
MASKED = b'{"error": {"message": "Incorrect API key provided: Bearer ***"}}'


def raw_deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


ENCODERS: dict[bytes, Callable[[bytes], bytes]] = {
    b"gzip": lambda data: gzip.compress(data, mtime=0),
    b"x-gzip": lambda data: gzip.compress(data, mtime=0),
    b"deflate": zlib.compress,
}


def headers_for(coding: bytes | None) -> RawHeaders:
    headers = [(b"content-type", b"application/json"), (b"x-request-id", b"req_1")]
    if coding is not None:
        headers.append((b"content-encoding", coding))
    return headers


def test_an_identity_error_body_quoting_the_key_is_masked_with_its_own_length() -> None:
    masked = masked_error_body([ERROR[:20], ERROR[20:]], headers_for(None), SECRETS)
    assert masked == (
        [*headers_for(None), (b"content-length", str(len(MASKED)).encode())],
        [MASKED],
    )


@pytest.mark.parametrize("coding", sorted(ENCODERS))
def test_a_compressed_error_body_quoting_the_key_goes_out_masked_and_decoded(
    coding: bytes,
) -> None:
    body = ENCODERS[coding](ERROR)
    masked = masked_error_body([body], headers_for(coding), SECRETS)
    assert masked is not None
    headers, chunks = masked
    assert chunks == [MASKED]
    assert (b"content-encoding", coding) not in headers
    assert (b"content-length", str(len(MASKED)).encode()) in headers


def test_raw_deflate_sent_as_deflate_is_read_too() -> None:
    # RFC 9110 §8.4.1.2 says zlib-wrapped; some servers send raw deflate, and clients accept it.
    masked = masked_error_body([raw_deflate(ERROR)], headers_for(b"deflate"), SECRETS)
    assert masked is not None
    assert masked[1] == [MASKED]


@pytest.mark.parametrize("coding", [None, b"gzip"])
def test_an_error_body_without_a_secret_is_left_alone(coding: bytes | None) -> None:
    body = b'{"error": {"message": "model overloaded"}}'
    encoded = body if coding is None else gzip.compress(body)
    assert masked_error_body([encoded], headers_for(coding), SECRETS) is None


def test_a_coding_the_gateway_did_not_ask_for_is_not_read() -> None:
    assert masked_error_body([ERROR], headers_for(b"br"), SECRETS) is None


def test_a_truncated_gzip_body_is_searched_as_far_as_it_inflates() -> None:
    # A lenient client would show what inflates before the cut, the key included.
    body = gzip.compress(ERROR)[:-8]  # without its CRC and length
    masked = masked_error_body([body], headers_for(b"gzip"), SECRETS)
    assert masked is not None
    assert masked[1] == [MASKED]


def test_a_body_inflating_past_the_bound_is_not_inflated_further() -> None:
    bomb = gzip.compress(b'{"error": "' + KEY + b'"' + b" " * ERROR_BODY_BYTES + b"}")
    assert inflated_body(bomb, b"gzip", ERROR_BODY_BYTES) is None
    assert masked_error_body([bomb], headers_for(b"gzip"), SECRETS) is None


def test_a_body_inflating_to_exactly_the_bound_is_read() -> None:
    body = b" " * (ERROR_BODY_BYTES - len(KEY)) + KEY
    assert inflated_body(gzip.compress(body), b"gzip", ERROR_BODY_BYTES) == body


def test_corrupt_compressed_bytes_are_not_read() -> None:
    assert inflated_body(b"\x1f\x8bnot gzip at all", b"gzip", ERROR_BODY_BYTES) == b""
    assert masked_error_body([b"\x1f\x8bnot gzip " + KEY], headers_for(b"gzip"), SECRETS) is None
