"""Reading a ``multipart/form-data`` request body with bounded memory and work.

The body is fed to python-multipart's streaming parser as it arrives from the ASGI receive loop; limits on the
body, parts, part sizes and part header bytes refuse a hostile body as soon as it crosses one, before it is
buffered. Every refusal is a starlette ``HTTPException`` with a 4xx status and a message saying what was wrong.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import NamedTuple

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.exceptions import HTTPException
from starlette.requests import Request

MAX_CONTENT_LENGTH_DIGITS = 19  # fits a signed 64-bit integer
MAX_CONTENT_TYPE_BYTES = 1024  # far beyond any real multipart Content-Type; keeps its parsing trivially cheap


@dataclass(frozen=True)
class FormLimits:
    """What one request body may contain."""

    max_body_bytes: int  # the whole body
    max_part_bytes: int  # the data of one part
    max_parts: int  # parts per body
    max_header_bytes: int  # header bytes of one part (names and values)
    max_headers: int  # headers per part
    timeout_s: float  # time to receive the whole body


class Part(NamedTuple):
    """One multipart/form-data part that was kept."""

    name: str
    filename: str | None
    data: bytes


class Form(NamedTuple):
    """The parts named as requested, in order, and the names of all parts (for error messages)."""

    parts: list[Part]
    names: list[str]


def check_content_length(declared: str | None, max_bytes: int) -> None:
    """400 unless ``Content-Length`` is 1-19 ASCII digits; 413 when it declares more than ``max_bytes``."""
    if declared is None:
        return
    if not (0 < len(declared) <= MAX_CONTENT_LENGTH_DIGITS and declared.isascii() and declared.isdigit()):
        shown = declared[:24] + ("..." if len(declared) > 24 else "")
        raise HTTPException(
            400, f"invalid Content-Length {shown!r}: expected 1 to {MAX_CONTENT_LENGTH_DIGITS} ASCII digits"
        )
    if int(declared) > max_bytes:
        raise HTTPException(413, f"request body of {int(declared)} bytes exceeds the limit of {max_bytes}")


def boundary_of(content_type: str, field_name: str) -> bytes:
    """The boundary of a ``multipart/form-data`` Content-Type: 415 for another media type, 400 without one."""
    media_type = content_type.partition(";")[0].strip().lower()
    if media_type != "multipart/form-data":
        got = media_type[:64] or "no Content-Type"
        raise HTTPException(415, f"expected multipart/form-data with a '{field_name}' field, got {got}")
    if len(content_type) > MAX_CONTENT_TYPE_BYTES:
        raise HTTPException(
            400, f"malformed multipart body: Content-Type longer than {MAX_CONTENT_TYPE_BYTES}"
        )
    boundary = parse_options_header(content_type)[1].get(b"boundary", b"")
    if not 0 < len(boundary) <= 70:  # RFC 2046: 1 to 70 characters
        raise HTTPException(400, "malformed multipart body: Content-Type has no boundary (1-70 characters)")
    return boundary


class _Collector:
    """python-multipart callbacks: keeps the parts named ``field_name`` and enforces the per-part limits."""

    def __init__(self, field_name: str, limits: FormLimits) -> None:
        self.field_name = field_name
        self.limits = limits
        self.parts: list[Part] = []
        self.names: list[str] = []
        self.ended = False
        self._count = 0
        self._header_bytes = 0
        self._field: list[bytes] = []
        self._value: list[bytes] = []
        self._disposition: bytes | None = None
        self._name = ""
        self._filename: str | None = None
        self._chunks: list[bytes] | None = None  # None: this part's data is not kept
        self._size = 0

    def callbacks(self) -> dict[str, object]:
        """The callback table python-multipart calls."""
        return {
            "on_part_begin": self.part_begin,
            "on_header_field": self.header_field,
            "on_header_value": self.header_value,
            "on_header_end": self.header_end,
            "on_headers_finished": self.headers_finished,
            "on_part_data": self.part_data,
            "on_part_end": self.part_end,
            "on_end": self.end,
        }

    def part_begin(self) -> None:
        """A new part: count it against ``max_parts``."""
        self._count += 1
        if self._count > self.limits.max_parts:
            raise HTTPException(413, f"too many parts in one request (limit {self.limits.max_parts})")
        self._header_bytes = self._size = 0
        self._disposition = self._chunks = None
        self._field, self._value = [], []

    def _count_header(self, length: int) -> None:
        """Add header bytes of the current part; 413 past ``max_header_bytes``."""
        self._header_bytes += length
        if self._header_bytes > self.limits.max_header_bytes:
            raise HTTPException(413, f"a part's headers exceed {self.limits.max_header_bytes} bytes")

    def header_field(self, data: bytes, start: int, end: int) -> None:
        """Some bytes of a header name."""
        self._count_header(end - start)
        self._field.append(data[start:end])

    def header_value(self, data: bytes, start: int, end: int) -> None:
        """Some bytes of a header value."""
        self._count_header(end - start)
        self._value.append(data[start:end])

    def header_end(self) -> None:
        """One header complete: keep it if it is the Content-Disposition."""
        if b"".join(self._field).strip().lower() == b"content-disposition":
            self._disposition = b"".join(self._value)
        self._field, self._value = [], []

    def headers_finished(self) -> None:
        """The part's name and filename from its Content-Disposition; 400 without a name."""
        _, params = parse_options_header(self._disposition)  # bounded by max_header_bytes
        name = params.get(b"name")
        if name is None:
            raise HTTPException(400, "malformed multipart body: a part has no Content-Disposition name")
        filename = params.get(b"filename")
        self._name = name.decode("utf-8", "replace").strip()
        self._filename = None if filename is None else filename.decode("utf-8", "replace").strip()
        self.names.append(self._name)
        self._chunks = [] if self._name == self.field_name else None

    def part_data(self, data: bytes, start: int, end: int) -> None:
        """Some bytes of the part's data: kept for the requested field, counted for every part."""
        self._size += end - start
        if self._size > self.limits.max_part_bytes:
            raise HTTPException(
                413, f"multipart part '{self._name}' exceeds the limit of {self.limits.max_part_bytes} bytes"
            )
        if self._chunks is not None:
            self._chunks.append(data[start:end])

    def part_end(self) -> None:
        """The part is complete."""
        if self._chunks is not None:
            data = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
            self.parts.append(Part(self._name, self._filename, data))
            self._chunks = None

    def end(self) -> None:
        """The closing boundary was seen."""
        self.ended = True


def _parse_error(exc: MultipartParseError, limits: FormLimits) -> HTTPException:
    """A 4xx for python-multipart's refusal: 413 for its header limits, 400 for malformed input."""
    message = str(exc)
    if "header size" in message:
        return HTTPException(413, f"a part's header line exceeds {limits.max_header_bytes} bytes")
    if "header count" in message:
        return HTTPException(413, f"a part has more than {limits.max_headers} headers")
    return HTTPException(400, f"malformed multipart body: {message[:200]}")


async def read_form(request: Request, field_name: str, limits: FormLimits) -> Form:
    """Receive and parse the body of a ``multipart/form-data`` request, keeping the parts named ``field_name``.

    Raises a 4xx ``HTTPException``: 400 malformed, 408 body too slow, 413 over a limit, 415 not multipart.
    """
    headers = request.headers
    boundary = boundary_of(headers.get("content-type", ""), field_name)
    check_content_length(headers.get("content-length"), limits.max_body_bytes)
    collector = _Collector(field_name, limits)
    parser = MultipartParser(
        boundary,
        collector.callbacks(),  # type: ignore[arg-type]
        max_header_count=limits.max_headers,
        max_header_size=limits.max_header_bytes,
    )
    size = 0
    try:
        async with asyncio.timeout(limits.timeout_s):
            while True:  # raw ASGI messages: cheaper than request.stream() on the hot path
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    raise HTTPException(400, "client disconnected before sending the whole body")
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limits.max_body_bytes:
                    raise HTTPException(
                        413, f"request body exceeds the limit of {limits.max_body_bytes} bytes"
                    )
                if chunk:
                    parser.write(chunk)
                if not message.get("more_body", False):
                    break
    except TimeoutError:
        raise HTTPException(408, f"request body not received within {limits.timeout_s:g} s") from None
    except MultipartParseError as exc:
        raise _parse_error(exc, limits) from None
    if size == 0:
        raise HTTPException(400, f"empty request body: send multipart/form-data with a '{field_name}' field")
    if not collector.ended:
        raise HTTPException(400, "malformed or truncated multipart body: closing boundary not found")
    return Form(collector.parts, collector.names)
