"""Signed preview and QA grants: what a preview link or a QA link lets one browser do.

A **preview grant** makes a browser see what one customer, or one audience (a set of
in-session attributes), would see; a **QA grant** shows the debug overlay and the
``Server-Timing`` header to that browser. Both are minted with the app's ``secret_key``
(``preview_link`` / ``qa_link``, or ``personalize-middleware preview`` / ``qa-cookie``),
opened once as a link (the middleware's ``{prefix}/preview`` / ``{prefix}/qa`` endpoint
checks it and sets a cookie holding it) and expire. Token format::

    <kind>.<payload>.<signature>
    kind      = "pv1" (preview) | "qa1" (QA)
    payload   = base64url(JSON {"c": customer_id | null, "a": {name: value}, "x": expires,
                                "g": grant id} | {"x": expires, "l": label, "g": grant id})
    signature = base64url(HMAC-SHA256(the Keyring's "preview" / "qa" key,
                                      "<kind>.<payload>")[:16])

Every field is under the signature: a changed attribute, customer or expiry does not
verify, nor does a QA token used as a preview token (another key). Anything that does
not verify is ignored, never an error page.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any
from urllib.parse import urlencode, urlsplit

from ._exceptions import ConfigurationError
from ._models import Identity
from ._signing import Keyring, b64url_decode, b64url_encode

__all__ = [
    "COOKIE_PREFIX",
    "DEFAULT_PREVIEW_TTL",
    "DEFAULT_QA_TTL",
    "DEVICE_USER_AGENTS",
    "MAX_PREVIEW_TTL",
    "MAX_QA_TTL",
    "PREVIEW_COOKIE",
    "QA_COOKIE",
    "PreviewGrant",
    "QAGrant",
    "decode_preview",
    "decode_qa",
    "encode_preview",
    "encode_qa",
    "parse_duration",
    "preview_link",
    "qa_link",
    "safe_next",
]

#: Both cookies start with it: one substring test tells a request carries neither.
COOKIE_PREFIX = "pmdev_"
PREVIEW_COOKIE = COOKIE_PREFIX + "preview"
QA_COOKIE = COOKIE_PREFIX + "qa"
DEFAULT_PREVIEW_TTL = 3600.0
MAX_PREVIEW_TTL = 24 * 3600.0
DEFAULT_QA_TTL = 8 * 3600.0
MAX_QA_TTL = 7 * 24 * 3600.0
#: ``device=...`` in a preview stands for a typical user agent of that kind of device.
DEVICE_USER_AGENTS: Mapping[str, str] = MappingProxyType(
    {
        "mobile": "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 "
        "(KHTML, like Gecko) Version/17.4 Mobile/15E148 Safari/604.1",
        "tablet": "Mozilla/5.0 (iPad; CPU OS 17_4 like Mac OS X) AppleWebKit/605.1.15 "
        "(KHTML, like Gecko) Version/17.4 Safari/604.1",
        "desktop": "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 "
        "(KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36",
    }
)

_PREVIEW_KIND = "pv1"
_QA_KIND = "qa1"
_PURPOSES = {_PREVIEW_KIND: "preview", _QA_KIND: "qa"}
_MAX_TOKEN_CHARS = 4096
_MAX_ATTRIBUTES = 32
_MAX_NAME = 64
_MAX_VALUE = 512
_MAX_ID = 256
_MAX_LABEL = 80
_MAX_NEXT = 2048
_GRANT_ID = re.compile(r"[A-Za-z0-9_-]{8,32}")
_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True, slots=True)
class PreviewGrant:
    """A verified preview: whose experiences this browser sees, until ``expires``.

    ``customer_id`` ``None`` previews an audience: ``attributes`` with an identity of its
    own (``preview-<grant_id>``), so nothing is cached for the previewer's own visitor
    id and nothing reaches another visitor."""

    customer_id: str | None
    attributes: Mapping[str, str]
    expires: int
    grant_id: str

    @property
    def identity(self) -> Identity:
        """Who the fetch is made for."""
        if self.customer_id is not None:
            return Identity(customer_id=self.customer_id)
        return Identity(visitor_id="preview-" + self.grant_id)

    async def resolve(self) -> Identity:
        """``identity``, as the middleware's identity factory wants it."""
        return self.identity

    @property
    def label(self) -> str:
        """``customer alice, utm_medium=email`` (for the banner)."""
        who = [f"customer {self.customer_id}"] if self.customer_id is not None else []
        return ", ".join(who + [f"{k}={v}" for k, v in self.attributes.items()]) or "a visitor"

    def apply(self, attributes: Mapping[str, str]) -> dict[str, str]:
        """The request's in-session attributes with the preview's over them (``device``
        becomes a ``USER_AGENT`` of that kind of device)."""
        merged = dict(attributes)
        for name, value in self.attributes.items():
            if name == "device" and value in DEVICE_USER_AGENTS:
                merged["USER_AGENT"] = DEVICE_USER_AGENTS[value]
            else:
                merged[name] = value
        return merged


@dataclass(frozen=True, slots=True)
class QAGrant:
    """A verified QA grant: this browser gets the overlay and ``Server-Timing``."""

    expires: int
    label: str
    grant_id: str


# -- encoding ---------------------------------------------------------------------------------


def _encode(keyring: Keyring, kind: str, payload: dict[str, Any]) -> str:
    raw = json.dumps(payload, separators=(",", ":"), sort_keys=True, ensure_ascii=True)
    body = kind + "." + b64url_encode(raw.encode("ascii"))
    return body + "." + keyring.sign(_PURPOSES[kind], body.encode("ascii"))


def _decode(keyring: Keyring, kind: str, token: object, now: float) -> dict[str, Any] | None:
    if not isinstance(token, str) or not 0 < len(token) <= _MAX_TOKEN_CHARS:
        return None
    body, _, signature = token.rpartition(".")
    found_kind, _, payload = body.partition(".")
    if found_kind != kind or not body.isascii():
        return None
    if keyring.verify(_PURPOSES[kind], body.encode("ascii"), signature) is None:
        return None
    try:
        data = json.loads(b64url_decode(payload))
    except (ValueError, RecursionError):  # signed by us: only a bug of ours gets here
        return None
    if not isinstance(data, dict):
        return None
    expires = data.get("x")
    if type(expires) is not int or expires <= now:
        return None
    grant_id = data.get("g")
    if not isinstance(grant_id, str) or not _GRANT_ID.fullmatch(grant_id):
        return None
    return data


def encode_preview(
    keyring: Keyring,
    *,
    customer_id: str | None = None,
    attributes: Mapping[str, str] | None = None,
    ttl: float | str = DEFAULT_PREVIEW_TTL,
    now: float | None = None,
) -> str:
    """A signed preview token (a cookie value) for ``customer_id`` and/or ``attributes``.
    Raises ``ConfigurationError`` for an empty preview, a bad attribute or ttl."""
    attrs = _checked_attributes(attributes or {})
    if customer_id is not None:
        customer_id = _checked_text("customer_id", customer_id, _MAX_ID)
    if customer_id is None and not attrs:
        raise ConfigurationError(
            "a preview needs a customer_id, attributes or both", field="customer_id"
        )
    seconds = _checked_ttl(ttl, MAX_PREVIEW_TTL)
    expires = int((time.time() if now is None else now) + seconds)
    payload = {"c": customer_id, "a": attrs, "x": expires, "g": _new_grant_id()}
    return _encode(keyring, _PREVIEW_KIND, payload)


def decode_preview(
    keyring: Keyring, token: object, now: float | None = None
) -> PreviewGrant | None:
    """The grant ``token`` carries, or ``None`` (malformed, forged, tampered, expired)."""
    data = _decode(keyring, _PREVIEW_KIND, token, time.time() if now is None else now)
    if data is None:
        return None
    customer_id, attributes = data.get("c"), data.get("a")
    if customer_id is not None and not _is_text(customer_id, _MAX_ID):
        return None
    if not isinstance(attributes, dict) or len(attributes) > _MAX_ATTRIBUTES:
        return None
    for name, value in attributes.items():
        if not _is_text(name, _MAX_NAME) or not _is_text(value, _MAX_VALUE):
            return None
    if customer_id is None and not attributes:
        return None
    return PreviewGrant(customer_id, MappingProxyType(attributes), data["x"], data["g"])


def encode_qa(
    keyring: Keyring,
    *,
    ttl: float | str = DEFAULT_QA_TTL,
    label: str | None = None,
    now: float | None = None,
) -> str:
    """A signed QA token (a cookie value); ``label`` names whose it is (shown in the
    overlay, handy when several people test)."""
    text = _checked_text("label", label, _MAX_LABEL) if label else ""
    seconds = _checked_ttl(ttl, MAX_QA_TTL)
    expires = int((time.time() if now is None else now) + seconds)
    return _encode(keyring, _QA_KIND, {"x": expires, "l": text, "g": _new_grant_id()})


def decode_qa(keyring: Keyring, token: object, now: float | None = None) -> QAGrant | None:
    """The QA grant ``token`` carries, or ``None``."""
    data = _decode(keyring, _QA_KIND, token, time.time() if now is None else now)
    if data is None:
        return None
    label = data.get("l", "")
    if not isinstance(label, str) or (label and not _is_text(label, _MAX_LABEL)):
        return None
    return QAGrant(data["x"], label, data["g"])


# -- links ------------------------------------------------------------------------------------


def preview_link(
    url: str,
    *,
    secret_key: str | Sequence[str] | Keyring,
    customer_id: str | None = None,
    attributes: Mapping[str, str] | None = None,
    ttl: float | str = DEFAULT_PREVIEW_TTL,
    prefix: str = "/_personalize",
) -> str:
    """A link that makes the browser opening it see page ``url`` (and the rest of the
    site, until the preview expires or is left) as ``customer_id`` and/or the audience of
    ``attributes`` would, e.g. ``attributes={"utm_medium": "email", "device": "mobile"}``.

    ``secret_key`` is the app's (``PersonalizeMiddleware(secret_key=...)``); the app must
    run with ``preview=True``. ``ttl``: seconds or ``"30m"``, ``"1h"`` (at most a day).
    ``prefix``: the middleware's ``tracking_prefix``, with the mount path if the app is
    mounted below the site's root."""
    token = encode_preview(
        _keyring(secret_key), customer_id=customer_id, attributes=attributes, ttl=ttl
    )
    return _link(url, prefix, "/preview", token)


def qa_link(
    url: str,
    *,
    secret_key: str | Sequence[str] | Keyring,
    ttl: float | str = DEFAULT_QA_TTL,
    label: str | None = None,
    prefix: str = "/_personalize",
) -> str:
    """A link that gives the browser opening it a QA cookie (the debug overlay and
    ``Server-Timing`` on every page, until ``ttl`` runs out, at most a week), then shows
    page ``url``."""
    token = encode_qa(_keyring(secret_key), ttl=ttl, label=label)
    return _link(url, prefix, "/qa", token)


def _link(url: str, prefix: str, endpoint: str, token: str) -> str:
    if not isinstance(url, str) or not url.strip():
        raise ConfigurationError("url must be the page to open, e.g. https://shop/", field="url")
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https", "") or bool(parts.scheme) != bool(parts.netloc):
        raise ConfigurationError(
            f"url must be http(s)://host/path or a path starting with '/', got {url!r}",
            field="url",
        )
    if not parts.netloc and not parts.path.startswith("/"):
        raise ConfigurationError(f"url must start with '/' or http(s)://, got {url!r}", field="url")
    if not prefix.startswith("/") or prefix.endswith("/"):
        raise ConfigurationError("prefix must start with '/' and not end with '/'", field="prefix")
    target = (parts.path or "/") + ("?" + parts.query if parts.query else "")
    origin = f"{parts.scheme}://{parts.netloc}" if parts.netloc else ""
    return f"{origin}{prefix}{endpoint}?" + urlencode({"token": token, "next": target})


def safe_next(value: str | None, default: str = "/") -> str:
    """``value`` if it is a path on this site to redirect to, else ``default``: starts
    with one ``/`` (``//host`` and ``/\\host`` are other sites to a browser), printable
    ASCII, no whitespace, at most 2,048 characters."""
    if (
        not value
        or len(value) > _MAX_NEXT
        or not value.startswith("/")
        or value[1:2] in ("/", "\\")
        or not value.isascii()
        or not value.isprintable()
        or any(c in value for c in " \\\"'<>`")
    ):
        return default
    return value


# -- helpers ----------------------------------------------------------------------------------


def parse_duration(value: float | str) -> float:
    """Seconds from ``3600``, ``"3600"``, ``"90s"``, ``"30m"``, ``"1h"``, ``"2d"``."""
    if isinstance(value, bool):
        raise ConfigurationError("ttl must be a duration, not a boolean", field="ttl")
    if isinstance(value, int | float):
        return float(value)
    match = _DURATION.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise ConfigurationError(
            f"ttl must be seconds or a duration like 30m, 1h, 2d; got {value!r}", field="ttl"
        )
    return float(match.group(1)) * _UNITS[match.group(2)]


def _checked_ttl(ttl: float | str, maximum: float) -> float:
    seconds = parse_duration(ttl)
    if not 1 <= seconds <= maximum:
        raise ConfigurationError(
            f"ttl must be between 1 second and {maximum / 3600:g} hours, got {seconds:g} s",
            field="ttl",
        )
    return seconds


def _is_text(value: object, limit: int) -> bool:
    return isinstance(value, str) and 0 < len(value) <= limit and value.isprintable()


def _checked_text(field: str, value: object, limit: int) -> str:
    if not isinstance(value, str):
        raise ConfigurationError(f"{field} must be a string", field=field)
    text = value.strip()
    if not _is_text(text, limit):
        raise ConfigurationError(
            f"{field} must be 1 to {limit} printable characters, got {value!r}", field=field
        )
    return text


def _checked_attributes(attributes: Mapping[str, str]) -> dict[str, str]:
    if not isinstance(attributes, Mapping):
        raise ConfigurationError(
            "attributes must be a mapping of names to values", field="attributes"
        )
    if len(attributes) > _MAX_ATTRIBUTES:
        raise ConfigurationError(
            f"at most {_MAX_ATTRIBUTES} attributes in a preview", field="attributes"
        )
    checked: dict[str, str] = {}
    for name, value in attributes.items():
        key = _checked_text("attribute name", name, _MAX_NAME)
        checked[key] = _checked_text(f"attribute {key}", value, _MAX_VALUE)
    device = checked.get("device")
    if device is not None and device not in DEVICE_USER_AGENTS:
        raise ConfigurationError(
            f"device must be one of {', '.join(DEVICE_USER_AGENTS)}, got {device!r}",
            field="attributes",
        )
    return checked


def _keyring(secret_key: str | Sequence[str] | Keyring) -> Keyring:
    if isinstance(secret_key, Keyring):
        return secret_key
    if not secret_key:
        raise ConfigurationError("secret_key is required: the app's secret_key", field="secret_key")
    return Keyring([secret_key] if isinstance(secret_key, str) else list(secret_key))


def _new_grant_id() -> str:
    return secrets.token_urlsafe(9)  # 12 characters
