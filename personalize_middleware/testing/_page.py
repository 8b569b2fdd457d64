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
    ``b_id``, where the script would send them, and the page views' manifests
    (``pages``, by render id: what hooks holding an index, ``"<render id>~3"``, stand
    for; the script sends the right one along)."""

    def __init__(self, text: str) -> None:
        self.impressions: list[str] = []
        self.clicks: dict[str, list[str]] = {}
        self.endpoint: str | None = None
        self.pages: dict[str, str] = {}
        found = [(kind, html.unescape(raw)) for kind, raw in _ATTR.findall(text)]
        for kind, value in found:
            fields = value.split(".")
            if kind == "page" and len(fields) == 5:
                self.pages[fields[1]] = value  # the last one lists the most, as the script
        for kind, value in found:
            if kind == "impression":
                self.impressions.append(value)
            elif kind == "click":
                self.clicks.setdefault(_b_id(value, self.pages), []).append(value)
            elif kind == "endpoint":
                self.endpoint = value

    def __repr__(self) -> str:
        return (
            f"HookedPage(impressions={len(self.impressions)}, clicks={sorted(self.clicks)}, "
            f"endpoint={self.endpoint!r}, manifests={len(self.pages)})"
        )


def _b_id(token: str, pages: Mapping[str, str]) -> str:
    # The element field of a click token is "c" + base64url(b_id) (see tracking/_tokens);
    # a hook's index ("<render id>~3") names its manifest's element (tracking/_pages).
    fields = token.split(".")
    element = fields[3] if len(fields) == 5 else ""
    view, mark, index = token.partition("~")
    listed = pages.get(view, "").split(".") if mark else []
    if len(listed) == 5 and index.isdigit():
        elements = listed[3].split("~")
        at = int(index)
        element = elements[at].lstrip("0123456789") if at < len(elements) else ""
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
    # One beacon per page view, as the script sends them (an index needs its manifest).
    groups: dict[str, list[str]] = {}
    for token in tokens:
        groups.setdefault(token.partition("~")[0] if "~" in token else "", []).append(token)
    status = 204
    for view, events in groups.items():
        body: dict[str, Any] = {"events": events}
        if view:
            if view not in page.pages:
                raise AssertionError(f"no manifest for page view {view!r} on the page")
            body["page"] = page.pages[view]
        response = client.post(page.endpoint, json=body, headers=headers)
        if status == 204:
            status = int(response.status_code)
    return status


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
