"""Reading multipart bodies (``ray_app.multipart``): streamed across ASGI messages, every limit, every refusal.

Run: pytest tests/test_multipart.py     (seconds, no Ray)
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import pytest
from starlette.exceptions import HTTPException
from starlette.requests import Request

from ray_app.multipart import Form, FormLimits, Part, read_form
from ray_app.serve import (
    Settings,
)
from tests.helpers import (
    multipart,
    part_with_headers,
)


def form_limits(**overrides: Any) -> FormLimits:
    """The default multipart limits with some replaced."""
    return replace(Settings().form_limits(), **overrides)


def read(
    body: bytes,
    content_type: str = "multipart/form-data; boundary=b0undary",
    field: str = "file",
    limits: FormLimits | None = None,
    chunk: int = 65536,
    content_length: bytes | None = None,
) -> Form:
    """``read_form`` over a body delivered in ``chunk``-byte ASGI messages."""
    messages = [body[i : i + chunk] for i in range(0, len(body), chunk)] or [b""]

    async def receive() -> dict[str, Any]:
        data = messages.pop(0)
        return {"type": "http.request", "body": data, "more_body": bool(messages)}

    headers = [(b"content-type", content_type.encode("latin-1"))]
    if content_length is not None:
        headers.append((b"content-length", content_length))
    request = Request({"type": "http", "method": "POST", "headers": headers}, receive)
    return asyncio.run(read_form(request, field, limits or form_limits()))


def refusal(*args: Any, **kwargs: Any) -> tuple[int, str]:
    """Status and detail of the 4xx ``read`` raises."""
    with pytest.raises(HTTPException) as raised:
        read(*args, **kwargs)
    return raised.value.status_code, raised.value.detail


@pytest.mark.parametrize("chunk", [1, 7, 64, 65536])
def test_multipart_keeps_binary_data_exactly_across_chunks(chunk: int) -> None:
    data = b"\r\n--b0undar\r\n--\x00\xff" * 50  # looks like a boundary but is not one
    body, content_type = multipart([("file", "x.png", data), ("note", None, b"hi"), ("file", None, b"")])
    form = read(body + b"epilogue", content_type, chunk=chunk)
    assert form.parts == [Part("file", "x.png", data), Part("file", None, b"")]
    assert form.names == ["file", "note", "file"]  # other parts are named but not kept


def test_multipart_quoted_boundary_and_escaped_filename() -> None:
    body = (
        b"--a:b c\r\nContent-Type: image/png\r\n"
        b'content-disposition: form-data; filename="q\\"x.png"; name=file\r\n'
        b"\r\nDATA\r\n--a:b c--"
    )
    (part,) = read(body, 'multipart/form-data; boundary="a:b c"').parts
    assert part == ("file", 'q"x.png', b"DATA")


@pytest.mark.parametrize(
    ("body", "content_type", "status", "detail"),
    [
        (part_with_headers(b"Content-Type: image/png"), None, 400, "no Content-Disposition name"),
        (b"--b0undary\r\nContent-Disposition: form-data; name=file\r\n\r\nDATA", None, 400, "truncated"),
        (b"DATA", None, 400, "malformed multipart body"),
        (b"preamble\r\n" + part_with_headers(b"Content-Disposition: form-data; name=file"), None, 400, ""),
        (part_with_headers(b"Bad Header: x"), None, 400, "malformed multipart body"),
        (b"DATA", "image/png", 415, "expected multipart/form-data with a 'file' field, got image/png"),
        (b"DATA", "multipart/form-data", 400, "no boundary"),
        (b"DATA", "multipart/form-data; boundary=" + "x" * 71, 400, "no boundary"),
        (b"DATA", "multipart/form-data; boundary=x; " + "a" * 2000, 400, "Content-Type longer than"),
        (b"", None, 400, "empty request body"),
    ],
)
def test_malformed_multipart(body: bytes, content_type: str | None, status: int, detail: str) -> None:
    got = refusal(body, content_type or "multipart/form-data; boundary=b0undary")
    assert got[0] == status and detail in got[1]


def test_part_header_bytes_are_limited_per_line_and_per_part() -> None:
    disposition = b"Content-Disposition: form-data; name=file"
    limits = form_limits(max_header_bytes=200)
    assert read(part_with_headers(disposition + b"; x=" + b"y" * 100), limits=limits).parts
    long_line = part_with_headers(disposition + b"; x=" + b"y" * 300)
    assert refusal(long_line, limits=limits) == (413, "a part's header line exceeds 200 bytes")
    assert refusal(long_line, limits=limits, chunk=16) == (413, "a part's header line exceeds 200 bytes")
    several = part_with_headers(disposition + b"".join(b"\r\nX-%d: %s" % (i, b"v" * 60) for i in range(4)))
    assert refusal(several, limits=limits) == (413, "a part's headers exceed 200 bytes")


def test_part_header_count_is_limited() -> None:
    headers = b"Content-Disposition: form-data; name=file" + b"\r\nX-A: 1" * 3
    assert read(part_with_headers(headers), limits=form_limits(max_headers=4)).parts
    assert refusal(part_with_headers(headers), limits=form_limits(max_headers=3)) == (
        413,
        "a part has more than 3 headers",
    )


def test_part_bytes_parts_and_body_bytes_are_limited() -> None:
    body, content_type = multipart([("note", None, b"x" * 101), ("file", "a.png", b"y")])
    assert refusal(body, content_type, limits=form_limits(max_part_bytes=100), chunk=50) == (
        413,
        "multipart part 'note' exceeds the limit of 100 bytes",
    )
    body, content_type = multipart([("file", None, b"x")] * 4)
    assert len(read(body, content_type, limits=form_limits(max_parts=4)).parts) == 4
    assert refusal(body, content_type, limits=form_limits(max_parts=3)) == (
        413,
        "too many parts in one request (limit 3)",
    )
    assert refusal(body, content_type, limits=form_limits(max_body_bytes=len(body) - 1), chunk=10)[0] == 413


@pytest.mark.parametrize(
    ("value", "status"),
    [
        (b"\xb2", 400),  # '\u00b2' (superscript two): str.isdigit() accepts it, int() does not
        (b"9" * 5000, 400),
        (b"9" * 20, 400),
        (b"-1", 400),
        (b"+12", 400),
        (b"1_000", 400),
        (b"", 400),
        (b"9" * 19, 413),  # well-formed, over the limit
    ],
)
def test_content_length_must_be_1_to_19_ascii_digits(value: bytes, status: int) -> None:
    code, detail = refusal(multipart([("file", None, b"x")])[0], content_length=value)
    assert code == status
    assert ("1 to 19 ASCII digits" in detail) == (status == 400) and len(detail) < 200


def test_slow_body_is_408() -> None:
    async def receive() -> dict[str, Any]:
        await asyncio.sleep(1)
        return {"type": "http.request", "body": b"x", "more_body": False}

    request = Request(
        {
            "type": "http",
            "method": "POST",
            "headers": [(b"content-type", b"multipart/form-data; boundary=x")],
        },
        receive,
    )
    with pytest.raises(HTTPException) as raised:
        asyncio.run(read_form(request, "file", form_limits(timeout_s=0.05)))
    assert raised.value.status_code == 408 and "not received within 0.05 s" in raised.value.detail
