"""The ``model`` field of a multipart form: found wherever it is, never copied with the files,
and refused when the upstream could read the form differently."""

from __future__ import annotations

import time

import pytest

from gateway import errors
from gateway.http.body import media_type
from gateway.http.multipart import (
    FORM_DATA,
    MAX_MODEL_BYTES,
    MAX_PARTS,
    FormModel,
    boundary,
    find_model,
    with_model,
)
from gateway.types import Body

BOUNDARY = b"gw-test-boundary"
AUDIO = b"RIFF\x00\x01\r\n--not-the-boundary\r\n" * 64


def part(name: bytes, value: bytes, *headers: bytes, filename: bytes | None = None) -> bytes:
    disposition = b'Content-Disposition: form-data; name="' + name + b'"'
    if filename is not None:
        disposition += b'; filename="' + filename + b'"'
    head = b"\r\n".join((disposition, *headers))
    return b"--" + BOUNDARY + b"\r\n" + head + b"\r\n\r\n" + value + b"\r\n"


def form(*parts: bytes) -> bytes:
    return b"".join(parts) + b"--" + BOUNDARY + b"--\r\n"


def model_of(body: Body) -> str | None:
    found = find_model(body, BOUNDARY)
    if found is None:
        return None
    assert body[found.start : found.end] == found.value.encode()
    return found.value


def refusal(body: bytes) -> errors.GatewayError:
    with pytest.raises(errors.GatewayError) as refused:
        find_model(body, BOUNDARY)
    assert (refused.value.status, refused.value.code) == (400, "invalid_multipart")
    return refused.value


FILE = part(b"file", AUDIO, b"Content-Type: audio/wav", filename=b"a.wav")
MODEL = part(b"model", b"whisper-1")


def test_the_model_field_is_found_before_the_file() -> None:
    assert model_of(form(MODEL, FILE, part(b"language", b"en"))) == "whisper-1"


def test_the_model_field_is_found_after_the_file() -> None:
    assert model_of(form(FILE, part(b"language", b"en"), MODEL)) == "whisper-1"


@pytest.mark.parametrize(
    "disposition",
    [
        b"Content-Disposition: form-data; name=model",
        b'content-disposition: form-data;name="model"',
        b'Content-Disposition: form-data; NAME="model"',
        b'Content-Disposition:   form-data ; name = "model"',
    ],
)
def test_the_name_is_read_however_it_is_quoted_or_cased(disposition: bytes) -> None:
    body = form(FILE, b"--" + BOUNDARY + b"\r\n" + disposition + b"\r\n\r\nwhisper-1\r\n")
    assert model_of(body) == "whisper-1"


def test_a_quoted_name_with_an_escaped_quote_is_another_field() -> None:
    body = form(part(b'model\\"', b"gpt-4o"), FILE)
    assert model_of(body) is None


def test_a_field_whose_value_merely_says_model_is_not_the_model() -> None:
    assert model_of(form(part(b"prompt", b'name="model"'), FILE)) is None


def test_a_form_without_a_model_field_has_none() -> None:
    """files.create sends a file and a purpose: it passes, as a JSON body without model does."""
    assert model_of(form(FILE, part(b"purpose", b"assistants"))) is None


def test_an_empty_model_is_an_empty_string_at_its_place() -> None:
    body = form(FILE, part(b"model", b""))
    found = find_model(body, BOUNDARY)
    assert found is not None
    assert found.value == ""
    assert body[found.start - 4 : found.start + 4] == b"\r\n\r\n\r\n--"


def test_a_huge_file_part_is_skipped_in_place() -> None:
    """A 30 MiB upload costs a boundary search, not a copy or a byte-by-byte walk."""
    huge = part(b"file", b"\x00\r\n-" * (30 * 1024 * 1024 // 4), filename=b"big.wav")
    body = form(huge, MODEL)
    started = time.perf_counter()
    assert model_of(body) == "whisper-1"
    assert time.perf_counter() - started < 1.0


def test_a_bytearray_body_is_read_in_place() -> None:
    assert model_of(bytearray(form(FILE, MODEL))) == "whisper-1"


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"not a form at all", "boundary"),
        (form(FILE, MODEL)[:-30], "closing boundary"),
        (form(FILE, MODEL).replace(b"\r\n\r\nwhisper", b"\r\nwhisper"), "header"),
        (b"--" + BOUNDARY + b"\r\nno colon here\r\n\r\nx\r\n--" + BOUNDARY + b"--\r\n", ""),
        (b"", "closing boundary"),
    ],
    ids=["no-boundary", "cut", "no-blank-line", "bad-header", "empty"],
)
def test_a_malformed_form_is_400(body: bytes, reason: str) -> None:
    assert reason.lower() in refusal(body).message.lower()


def test_two_model_fields_are_refused_as_the_upstream_may_read_the_last() -> None:
    refused = refusal(form(MODEL, FILE, part(b"model", b"gpt-4o-transcribe")))
    assert refused.param == "model"


@pytest.mark.parametrize(
    "model_part",
    [
        part(b"model", b"d2hpc3Blci0x", b"Content-Transfer-Encoding: base64"),
        part(b"model", b"whisper-1", filename=b"model.txt"),
        b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="file"\r\n'
        b'Content-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n',
        b"--" + BOUNDARY + b"\r\nContent-Disposition: form-data; name*=UTF-8''model\r\n\r\n"
        b"gpt-4o\r\n",
    ],
    ids=["transfer-encoded", "a-file", "two-dispositions", "extended-name"],
)
def test_a_model_part_another_parser_could_read_differently_is_refused(model_part: bytes) -> None:
    refusal(form(FILE, model_part))


def test_a_binary_transfer_encoding_is_no_encoding() -> None:
    body = form(FILE, part(b"model", b"whisper-1", b"Content-Transfer-Encoding: binary"))
    assert model_of(body) == "whisper-1"


def test_parts_are_bounded() -> None:
    many = form(*(part(b"f%d" % i, b"x") for i in range(MAX_PARTS + 1)))
    assert str(MAX_PARTS) in refusal(many).message
    assert model_of(form(*(part(b"f%d" % i, b"x") for i in range(MAX_PARTS - 1)), MODEL))


def test_the_model_value_is_bounded() -> None:
    assert model_of(form(part(b"model", b"m" * MAX_MODEL_BYTES))) == "m" * MAX_MODEL_BYTES
    refusal(form(part(b"model", b"m" * (MAX_MODEL_BYTES + 1)), FILE))


def test_a_model_that_is_not_utf8_is_refused() -> None:
    refusal(form(part(b"model", b"\xff\xfe")))


@pytest.mark.parametrize(
    ("content_type", "expected"),
    [
        (b"multipart/form-data; boundary=abc", b"abc"),
        (b'multipart/form-data; charset=utf-8; boundary="a b:c"', b"a b:c"),
        (b"Multipart/Form-Data;Boundary=xyz", b"xyz"),
    ],
)
def test_the_boundary_comes_from_the_content_type(content_type: bytes, expected: bytes) -> None:
    assert boundary([(b"content-type", content_type)]) == expected


@pytest.mark.parametrize(
    "headers",
    [
        [(b"content-type", b"multipart/form-data")],
        [(b"content-type", b"multipart/form-data; boundary=")],
        [(b"content-type", b"multipart/form-data; boundary=" + b"b" * 257)],
        [],
    ],
)
def test_a_form_without_a_usable_boundary_is_400(headers: list[tuple[bytes, bytes]]) -> None:
    with pytest.raises(errors.GatewayError) as refused:
        boundary(headers)
    assert (refused.value.status, refused.value.code) == (400, "invalid_multipart")


# Renaming: only the model's bytes change.


def test_renaming_changes_only_the_models_bytes() -> None:
    body = form(FILE, MODEL, part(b"language", b"en"))
    found = find_model(body, BOUNDARY)
    assert found is not None
    renamed = with_model(body, found, "gpt-4o-transcribe", BOUNDARY)
    assert renamed == body.replace(b"\r\n\r\nwhisper-1\r\n", b"\r\n\r\ngpt-4o-transcribe\r\n")
    assert model_of(renamed) == "gpt-4o-transcribe"


def test_renaming_an_empty_model_fills_its_place() -> None:
    body = form(part(b"model", b""), FILE)
    found = find_model(body, BOUNDARY)
    assert found is not None
    assert model_of(with_model(body, found, "whisper-1", BOUNDARY)) == "whisper-1"


@pytest.mark.parametrize("name", ["a\r\nb", "x--gw-test-boundary", "line\nfeed"])
def test_a_new_name_that_could_end_the_part_is_refused(name: str) -> None:
    body = form(MODEL)
    found = find_model(body, BOUNDARY)
    assert isinstance(found, FormModel)
    with pytest.raises(errors.GatewayError):
        with_model(body, found, name, BOUNDARY)


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        (
            [(b"content-type", b"multipart/form-data; boundary=AAA; boundary=BBB")],
            "more than one boundary",
        ),
        ([(b"content-type", b'multipart/form-data; boundary=AAA;BOUNDARY="B"')], "more than one"),
        ([(b"content-type", b"multipart/form-data; boundary*=utf-8''AAA")], "boundary*"),
        (
            [(b"content-type", b"multipart/form-data; boundary=AAA; boundary*=utf-8''BBB")],
            "more than one boundary",
        ),
        ([(b"content-type", b"multipart/form-data; boundary*0=AAA")], "boundary*"),
        (
            [
                (b"content-type", b"multipart/form-data; boundary=AAA"),
                (b"content-type", b"multipart/form-data; boundary=BBB"),
            ],
            "more than one content-type",
        ),
    ],
    ids=[
        "two-boundaries",
        "two-boundaries-cased",
        "extended",
        "plain-and-extended",
        "continued",
        "two-headers",
    ],
)
def test_a_content_type_another_parser_could_split_elsewhere_is_400(
    headers: list[tuple[bytes, bytes]], reason: str
) -> None:
    with pytest.raises(errors.GatewayError) as refused:
        boundary(headers)
    assert (refused.value.status, refused.value.code) == (400, "invalid_multipart")
    assert reason.lower() in refused.value.message.lower()


def test_a_parameter_merely_starting_with_boundary_is_another_parameter() -> None:
    content_type = b"multipart/form-data; boundaryx=AAA; boundary=BBB"
    assert boundary([(b"content-type", content_type)]) == b"BBB"


def test_two_content_type_headers_are_refused_before_the_body_is_read_by_type() -> None:
    headers = [(b"content-type", b"application/json"), (b"content-type", FORM_DATA)]
    with pytest.raises(errors.GatewayError) as refused:
        media_type(headers)
    assert refused.value.status == 400
    assert media_type([(b"content-type", b"Multipart/Form-Data; boundary=x")]) == FORM_DATA
    assert media_type([]) == b""


@pytest.mark.parametrize(
    "epilogue",
    [
        b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="model"\r\n\r\ngpt-4o\r\n'
        b"--" + BOUNDARY + b"--\r\n",
        b"anything",
        b"\r\n \t x",
    ],
    ids=["another-form", "text", "text-after-blanks"],
)
def test_bytes_after_the_closing_delimiter_are_refused(epilogue: bytes) -> None:
    assert "after its closing boundary" in refusal(form(FILE, MODEL) + epilogue).message


@pytest.mark.parametrize("epilogue", [b"", b"\r\n", b" \t\r\n\r\n"])
def test_blanks_after_the_closing_delimiter_are_accepted(epilogue: bytes) -> None:
    assert model_of(form(FILE, MODEL) + epilogue) == "whisper-1"
    assert model_of(b"--" + BOUNDARY + b"--" + epilogue) is None
