"""The ``model`` field of a ``multipart/form-data`` body (RFC 7578), for the model rules.

Uploads such as ``audio.transcriptions`` and ``files.create`` are forms, not JSON. The body is
already held whole (``read_body``, within ``max_body_bytes``); it is parsed in place by
python-multipart, the streaming parser Starlette uses, which hands each part's data over as
offsets into the body: no part is copied, a file part costs one substring search for the next
boundary.

Every part's headers are read, not just those up to the first ``model``: an upstream that reads
the last of two ``model`` fields (Starlette's form does) would otherwise be called with a model
the gateway never checked. So the gateway refuses, with 400, whatever it could read differently
from the upstream: two ``model`` fields, a ``model`` part that is a file, has two
``Content-Disposition`` headers or a ``Content-Transfer-Encoding`` (deprecated by RFC 7578 §4.7:
the upstream might decode it), a ``name*`` parameter (forbidden by RFC 7578 §4.2: a parser that
honours it would see another name), a form cut before its closing delimiter or with more than
blanks after it, and a ``Content-Type`` with two ``boundary`` parameters or a ``boundary*`` one.
Reading on past the ``model`` field costs little: the parser skips a part's data with one
substring search (about 12 ms for a 32 MiB upload).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from python_multipart import MultipartParser
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import parse_options_header

from gateway import errors
from gateway.types import Body, RawHeaders

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

FORM_DATA = b"multipart/form-data"
# The most parts one form may have (Starlette's own default for fields): a transcription form
# has about ten. Each part's headers are parsed in Python, so this bounds the CPU a form costs.
MAX_PARTS = 1000
# The longest ``model`` value read: model ids are short, even ``org/name`` ones.
MAX_MODEL_BYTES = 1024
# RFC 2046 §5.1.1 allows at most 70 characters; python-multipart itself allows 256.
MAX_BOUNDARY_BYTES = 256

# A ``name*=`` parameter (RFC 7578 §4.2 forbids it; python-multipart ignores it).
_EXTENDED_NAME = re.compile(rb"(?:^|;)[ \t]*name[ \t]*\*", re.IGNORECASE)
# A ``boundary`` or ``boundary*`` parameter of the Content-Type; the group holds the ``*``.
_BOUNDARY_PARAM = re.compile(rb"(?:^|;)[ \t]*boundary[ \t]*(\*[^;=]*)?=", re.IGNORECASE)
_IDENTITY_TRANSFER = frozenset({b"7bit", b"8bit", b"binary"})
# python-multipart logs every malformed form as a warning: clients would write the gateway's log.
_QUIET = logging.Logger("gateway.http.multipart.parser", logging.CRITICAL + 1)


@dataclass(frozen=True, slots=True)
class FormModel:
    """The ``model`` field's value and where its bytes lie in the body: ``body[start:end]``."""

    value: str
    start: int
    end: int


def boundary(headers: RawHeaders) -> bytes:
    """The form's boundary, from its ``Content-Type`` (RFC 7578 §4.1)."""
    content_types = [value for name, value in headers if name == b"content-type"]
    if not content_types:
        raise errors.malformed_form("the Content-Type has no boundary")
    if len(content_types) > 1:
        # The upstream might split the body at the other header's boundary.
        raise errors.malformed_form("it has more than one Content-Type header")
    value = content_types[0]
    # Parsers differ on which of two boundaries counts, and on whether ``boundary*`` (RFC 2231)
    # does: the upstream could split the body at another boundary.
    declared = _BOUNDARY_PARAM.findall(value)
    if len(declared) > 1:
        raise errors.malformed_form("the Content-Type has more than one boundary")
    if declared and declared[0]:
        raise errors.malformed_form("the Content-Type has a 'boundary*' parameter")
    _, params = parse_options_header(value)
    found = params.get(b"boundary", b"")
    if not found or len(found) > MAX_BOUNDARY_BYTES:
        raise errors.malformed_form("the Content-Type has no valid boundary")
    return found


class _ModelFinder:
    """The parser's callbacks: they note where the ``model`` part's data lies, and nothing else
    of any part."""

    def __init__(self, body: Body) -> None:
        self.body = body
        self.parts = 0
        self.ended = False
        self.found: FormModel | None = None
        # The part being read: its Content-Disposition count, whether it is named "model", its
        # Content-Transfer-Encoding, and where its last header line starts.
        self.dispositions = 0
        self.is_model = False
        self.transfer: bytes | None = None
        self.line_start = -1
        self.data_start = -1
        self.data_end = -1
        # The end of the last data of any part: the closing delimiter lies after it.
        self.last_data_end = 0
        # The header being read.
        self.field = bytearray()
        self.value = bytearray()

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self.part_begin,
            "on_header_begin": self.header_begin,
            "on_header_field": self.header_field,
            "on_header_value": self.header_value,
            "on_header_end": self.header_end,
            "on_headers_finished": self.headers_finished,
            "on_part_data": self.part_data,
            "on_part_end": self.part_end,
            "on_end": self.end,
        }

    def part_begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise errors.malformed_form(f"it has more than {MAX_PARTS} parts")
        self.dispositions = 0
        self.is_model = False
        self.transfer = None

    def header_begin(self) -> None:
        self.field.clear()
        self.value.clear()
        self.line_start = -1

    def header_field(self, data: bytes, start: int, end: int) -> None:
        if self.line_start < 0:
            self.line_start = start
        self.field += data[start:end]  # bounded by the parser's header size limit

    def header_value(self, data: bytes, start: int, end: int) -> None:
        self.value += data[start:end]

    def header_end(self) -> None:
        name = self.field.strip().lower()
        if name == b"content-disposition":
            self.dispositions += 1
            value = bytes(self.value)
            if _EXTENDED_NAME.search(value):
                raise errors.malformed_form("a part's Content-Disposition has a 'name*' parameter")
            _, params = parse_options_header(value)
            if params.get(b"name") == b"model":
                if b"filename" in params:
                    raise errors.malformed_form("'model' is a file, not a field", "model")
                self.is_model = True
        elif name == b"content-transfer-encoding":
            self.transfer = bytes(self.value.strip().lower())

    def headers_finished(self) -> None:
        if not self.is_model:
            return
        if self.dispositions > 1:
            # Parsers differ on which of two Content-Dispositions names the part.
            raise errors.malformed_form("'model' has two Content-Disposition headers", "model")
        if self.transfer is not None and self.transfer not in _IDENTITY_TRANSFER:
            raise errors.malformed_form("'model' has a Content-Transfer-Encoding", "model")
        if self.found is not None:
            raise errors.malformed_form("it has more than one 'model' field", "model")
        # The parser accepted the part's head, so its last header line ends at the first CR
        # after the line's start, and a blank line (CRLF CRLF) separates it from the data.
        self.data_start = self.data_end = self.body.index(b"\r", self.line_start) + 4

    def part_data(self, data: bytes, start: int, end: int) -> None:
        self.last_data_end = end
        if not self.is_model:
            return
        if data is not self.body or start != self.data_end:
            # The whole body is written at once, so the data are one span of it.
            raise errors.malformed_form("'model' could not be located", "model")
        self.data_end = end
        if end - self.data_start > MAX_MODEL_BYTES:
            raise errors.malformed_form(f"'model' is longer than {MAX_MODEL_BYTES} bytes", "model")

    def part_end(self) -> None:
        if not self.is_model:
            return
        self.is_model = False
        raw = bytes(self.body[self.data_start : self.data_end])
        try:
            value = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise errors.malformed_form("'model' is not UTF-8", "model") from None
        self.found = FormModel(value, self.data_start, self.data_end)

    def end(self) -> None:
        self.ended = True


def find_model(body: Body, form_boundary: bytes) -> FormModel | None:
    """The form's ``model`` field, or None when it has none (``files.create``); a malformed
    form, or one the upstream could read differently, is refused with 400."""
    finder = _ModelFinder(body)
    try:
        parser = MultipartParser(form_boundary, finder.callbacks())
        parser.logger = _QUIET
        # One write: every callback's data is the body itself, at offsets into it.
        parser.write(body)  # type: ignore[arg-type]
    except FormParserError as exc:
        raise errors.malformed_form(str(exc).rstrip(".")) from None
    if not finder.ended:
        raise errors.malformed_form("it ends before its closing boundary")
    if not _only_blank_after_close(body, form_boundary, finder.last_data_end):
        # python-multipart skips what follows the closing delimiter; a parser that does not
        # (or that finds another closing delimiter) could read parts the gateway never saw.
        raise errors.malformed_form("it has data after its closing boundary")
    return finder.found


def _only_blank_after_close(body: Body, form_boundary: bytes, after: int) -> bool:
    """Whether nothing but blank bytes follows the first closing delimiter at or after
    ``after``. The parser ended at a closing delimiter no earlier than that one, so when only
    blanks follow this one, it is the one the parser ended at."""
    close = b"--" + form_boundary + b"--"
    if body.startswith(close):  # a form of no parts
        end = len(close)
    else:
        found = body.find(b"\r\n" + close, after)
        if found < 0:
            return False
        end = found + 2 + len(close)
    return not bytes(body[end:]).strip(b" \t\r\n")


def with_model(body: Body, found: FormModel, model: str, form_boundary: bytes) -> bytes:
    """``body`` with the ``model`` field's value replaced by ``model``: every other byte, the
    boundary and every other part included, stays as the client sent it."""
    value = model.encode("utf-8")
    if b"\r" in value or b"\n" in value or b"--" + form_boundary in value:
        # The new value must not be able to end the part or start another (RFC 2046 §5.1.1).
        raise errors.malformed_form("the form's boundary collides with the model's name", "model")
    return b"".join((body[: found.start], value, body[found.end :]))
