"""Response headers of personalized responses: private caching, ``Vary: Cookie``.

Runs in the middleware's send wrapper on ``http.response.start``, for every page that
used personalization or set the visitor cookie.
"""

from __future__ import annotations

from starlette.types import Message

__all__ = ["make_private"]


def make_private(message: Message, *, used: bool, set_cookie: bytes | None) -> None:
    """Mark the response ``message`` as personal: ``Cache-Control: private, no-store`` and
    ``Vary: Cookie`` when ``used``; the visitor cookie when ``set_cookie`` is given."""
    # A plain list rather than MutableHeaders: this runs for every personalized page.
    headers: list[tuple[bytes, bytes]] = list(message.get("headers", ()))
    message["headers"] = headers
    if used:
        cache_control = vary = None
        for key, value in headers:  # one pass; usually neither header is there yet
            if key == b"cache-control":
                if cache_control is None:
                    cache_control = value
            elif key == b"vary" and vary is None:
                vary = value
        if cache_control is None:
            headers.append((b"cache-control", b"private, no-store"))
        elif b"no-store" not in cache_control.lower():
            _set_header(headers, b"cache-control", b"private, no-store")
        if vary is None:
            headers.append((b"vary", b"Cookie"))
        elif b"cookie" not in vary.lower():
            _set_header(headers, b"vary", vary + b", Cookie" if vary else b"Cookie")
    if set_cookie is not None:
        headers.append((b"set-cookie", set_cookie))


def _set_header(headers: list[tuple[bytes, bytes]], name: bytes, value: bytes) -> None:
    """Set ``name`` to ``value`` in place of its first occurrence, dropping the others
    (what ``MutableHeaders.__setitem__`` does)."""
    found = [i for i, (key, _) in enumerate(headers) if key == name]
    for index in reversed(found[1:]):
        del headers[index]
    if found:
        headers[found[0]] = (name, value)
    else:
        headers.append((name, value))
