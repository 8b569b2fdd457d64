"""What the tracking script does in a browser, done from a test: find a page's tracking
hooks and send their beacons, as a visitor who saw (or clicked) them would."""

from __future__ import annotations

import html
import re
from collections.abc import Mapping, Sequence
from typing import Any, Protocol
from urllib.parse import urlsplit

from .._exceptions import TemplateUsageError
from .._signing import b64url_decode

__all__ = ["HookedPage", "click", "view"]

_ATTR = re.compile(r'\sdata-pz-(impression|click|endpoint|page)="([^"]*)"')


class _Client(Protocol):
    """A ``starlette.testclient.TestClient`` (or anything with its ``post``)."""

    def post(self, url: str, *, json: Any = ..., headers: Any = ...) -> Any: ...


class HookedPage:
    """The tracking hooks of one rendered page: impression tokens, click tokens by
    ``b_id``, where the script would send them, and the page's manifest (``page``: what
    hooks that hold an index, ``"~3"``, stand for; the script sends it along)."""

    def __init__(self, text: str) -> None:
        self.impressions: list[str] = []
        self.clicks: dict[str, list[str]] = {}
        self.endpoint: str | None = None
        self.page: str | None = None
        found = [(kind, html.unescape(raw)) for kind, raw in _ATTR.findall(text)]
        for kind, value in found:
            if kind == "page":
                self.page = value  # the last one lists the most hooks, as the script reads
        for kind, value in found:
            if kind == "impression":
                self.impressions.append(value)
            elif kind == "click":
                self.clicks.setdefault(_b_id(value, self.page), []).append(value)
            elif kind == "endpoint":
                self.endpoint = value

    def __repr__(self) -> str:
        return (
            f"HookedPage(impressions={len(self.impressions)}, clicks={sorted(self.clicks)}, "
            f"endpoint={self.endpoint!r}, manifest={self.page is not None})"
        )


def _b_id(token: str, page: str | None) -> str:
    # The element field of a click token is "c" + base64url(b_id) (see tracking/_tokens);
    # a hook's index ("~3") names the page manifest's element (see tracking/_pages).
    fields = token.split(".")
    element = fields[3] if len(fields) == 5 else ""
    listed = page.split(".") if page is not None and token.startswith("~") else []
    if len(listed) == 5 and token[1:].isdigit():
        elements = listed[3].split("~")
        index = int(token[1:])
        element = elements[index].lstrip("0123456789") if index < len(elements) else ""
    if not element.startswith("c"):
        return ""
    try:
        return b64url_decode(element[1:]).decode("utf-8", "replace")
    except ValueError:
        return ""


def _page(page: Any) -> HookedPage:
    return page if isinstance(page, HookedPage) else HookedPage(_text(page))


def _text(page: Any) -> str:
    text = getattr(page, "text", page)
    if not isinstance(text, str):
        raise TemplateUsageError("pass a response (with .text) or the page's HTML")
    return text


def _send(
    client: _Client,
    page: HookedPage,
    tokens: Sequence[str],
    origin: str | None,
    extra: Mapping[str, str] | None,
) -> int:
    if page.endpoint is None:
        raise AssertionError(
            "the page has no tracking script: render {{ personalize_script() }} in it"
        )
    headers = {**(extra or {}), "sec-fetch-site": "same-origin"}
    base = getattr(client, "base_url", None)
    if origin is None and base is not None:
        parts = urlsplit(str(base))
        origin = f"{parts.scheme}://{parts.netloc}"
    if origin is not None:
        headers["origin"] = origin
    body: dict[str, Any] = {"events": list(tokens)}
    if page.page is not None and any(token.startswith("~") for token in tokens):
        body["page"] = page.page
    response = client.post(page.endpoint, json=body, headers=headers)
    return int(response.status_code)


def view(
    client: _Client,
    page: Any,
    *,
    headers: Mapping[str, str] | None = None,
    origin: str | None = None,
) -> int:
    """Report every impression of ``page`` (a response or its HTML) as the tracking
    script does once the visitor has seen them; returns the beacon's status (204).

    The beacon must come from the visitor the page was rendered for: the client's
    cookies go along; pass ``headers`` if your app identifies users by a header."""
    hooked = _page(page)
    if not hooked.impressions:
        raise AssertionError(f"the page has no impression hooks: {hooked!r}")
    return _send(client, hooked, hooked.impressions, origin, headers)


def click(
    client: _Client,
    page: Any,
    b_id: str,
    *,
    headers: Mapping[str, str] | None = None,
    origin: str | None = None,
) -> int:
    """Click the element of ``page`` whose ``track_click`` named it ``b_id``; returns the
    beacon's status (204). ``headers`` as for ``view``."""
    hooked = _page(page)
    tokens = hooked.clicks.get(b_id)
    if not tokens:
        raise AssertionError(f"no element tracked as {b_id!r} on the page: {hooked!r}")
    return _send(client, hooked, tokens[:1], origin, headers)
