"""What each case of the malformed-request battery (``BATTERY`` in ``tests/test_reliability.py``) must get: its
exact status and a phrase of its JSON ``detail``, so a wrong route, method or parser path cannot pass."""

from __future__ import annotations

import httpx

NOT_AN_IMAGE = (415, "not an image in a supported format (PNG, JPEG, GIF, BMP, WebP)")
NO_DIGIT = (422, "no digit found")
TOO_SMALL = (422, "each side must be at least 8 pixels")
TOO_MANY_PIXELS = (413, "pixels; the limit is ")
OVER_THE_BODY_LIMIT = (413, "exceeds the limit of 5242880")


def _corrupt(fmt: str) -> tuple[int, str]:
    return 422, f"corrupt or truncated {fmt} image"


def _not_multipart(field: str, got: str) -> tuple[int, str]:
    return 415, f"expected multipart/form-data with a '{field}' field, got {got}"


def _method(method: str, path: str) -> tuple[int, str]:
    return 405, f"method {method} not allowed on {path}; use POST"


EXPECTED: dict[str, tuple[int, str]] = {
    "empty-body-no-content-type": _not_multipart("file", "no Content-Type"),
    "empty-body-multipart": (400, "empty request body: send multipart/form-data with a 'file' field"),
    "empty-file": (422, "empty upload"),
    "random-16-bytes": NOT_AN_IMAGE,
    "random-4-kb": NOT_AN_IMAGE,
    "random-1-mb": NOT_AN_IMAGE,
    "plain-text": NOT_AN_IMAGE,
    "svg": NOT_AN_IMAGE,
    "pdf": NOT_AN_IMAGE,
    "png-signature-only": _corrupt("PNG"),
    "png-header-only": _corrupt("PNG"),
    "png-truncated-half": _corrupt("PNG"),
    "jpeg-truncated-half": _corrupt("JPEG"),
    "jpeg-magic-then-garbage": _corrupt("JPEG"),
    "gif-truncated-half": _corrupt("GIF"),
    "webp-truncated-half": _corrupt("WebP"),
    "bmp-header-only": _corrupt("BMP"),
    "tiff": NOT_AN_IMAGE,
    "ico": NOT_AN_IMAGE,
    "tga": NOT_AN_IMAGE,
    "bomb-png-declares-30000x30000": TOO_MANY_PIXELS,
    "bomb-png-declares-6000x6000": TOO_MANY_PIXELS,
    "bomb-png-real-10000x3000-1bit": TOO_MANY_PIXELS,
    "animated-gif-blank-frames": NO_DIGIT,
    "animated-gif-4x4": TOO_SMALL,
    "animated-gif-truncated-in-first-frame": _corrupt("GIF"),
    "png-16bit-blank": NO_DIGIT,
    "png-16bit-5x5": TOO_SMALL,
    "png-16bit-truncated": _corrupt("PNG"),
    "jpeg-cmyk-blank": NO_DIGIT,
    "jpeg-cmyk-truncated": _corrupt("JPEG"),
    "png-palette-all-transparent": NO_DIGIT,
    "png-palette-alpha-truncated": _corrupt("PNG"),
    "size-1x5000": TOO_SMALL,
    "size-5000x1": TOO_SMALL,
    "size-20x5000": (422, "image is 20×5000; the aspect ratio must be at most 20:1"),
    "size-1x1": TOO_SMALL,
    "size-7x7": TOO_SMALL,
    "blank-white": NO_DIGIT,
    "blank-black": NO_DIGIT,
    "low-contrast": NO_DIGIT,
    "wrong-field-name": (422, "missing multipart field 'file' (got ['image'])"),
    "files-field-on-predict": (422, "missing multipart field 'file' (got ['files'])"),
    "two-file-fields": (422, "2 'file' fields; use POST /predict/batch with 'files'"),
    "json-body": _not_multipart("file", "application/json"),
    "form-urlencoded": _not_multipart("file", "application/x-www-form-urlencoded"),
    "raw-png-as-image-png": _not_multipart("file", "image/png"),
    "raw-png-as-octet-stream": _not_multipart("file", "application/octet-stream"),
    "raw-png-as-text-plain": _not_multipart("file", "text/plain"),
    "multipart-without-boundary": (400, "Content-Type has no boundary"),
    "multipart-boundary-mismatch": (400, "malformed multipart body"),
    "multipart-truncated": (400, "closing boundary not found"),
    "multipart-part-without-name": (400, "a part has no Content-Disposition name"),
    "huge-body-content-length": OVER_THE_BODY_LIMIT,
    "huge-body-chunked": OVER_THE_BODY_LIMIT,
    "get-predict": _method("GET", "/predict"),
    "put-predict": _method("PUT", "/predict"),
    "delete-predict": _method("DELETE", "/predict"),
    "get-predict-batch": _method("GET", "/predict/batch"),
    "patch-predict-batch": _method("PATCH", "/predict/batch"),
    "post-unknown-route": (404, "no route /predictions; see /docs"),
    "batch-too-many-files": (413, "too many parts in one request (limit 64)"),
    "batch-one-bad-file": (415, "files[1] (b.png): not an image in a supported format"),
    "batch-wrong-field": (422, "missing multipart field 'files' (got ['file'])"),
    "batch-empty-body": _not_multipart("files", "no Content-Type"),
}


def check_expected(response: httpx.Response, name: str) -> None:
    """The battery case ``name`` got its status and a JSON ``{"detail": ...}`` containing its phrase."""
    status, phrase = EXPECTED[name]
    assert response.status_code == status, (name, response.status_code, response.text[:300])
    assert response.headers["content-type"].startswith("application/json"), (name, response.headers)
    body = response.json()
    assert list(body) == ["detail"] and phrase in body["detail"], (name, body)
