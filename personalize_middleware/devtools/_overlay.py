"""What the developer tools add to a page and to its response headers.

``page_markup`` is appended to ``personalize_script()``'s output:

- the preview banner (``Preview as customer alice, utm_medium=email`` and an exit link);
- the debug overlay: a JSON data island (``<script type="application/json">``, which
  no browser executes, serialised with Jinja's ``htmlsafe_json_dumps``: ``<``, ``>``,
  ``&`` and ``'`` escaped, so a payload cannot close the element) and the overlay's
  script and stylesheet, served as files with an ``integrity`` hash, like the tracking
  script. The script builds the panel with ``textContent`` only and sets no inline
  style: it runs under a CSP without ``'unsafe-inline'``.

``server_timing`` is the ``Server-Timing`` value: how long the page waited for
experiences, and where they came from (``personalize;dur=0.0;desc="cache"``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from jinja2.utils import htmlsafe_json_dumps
from markupsafe import Markup, escape

from .._grants import PreviewGrant, QAGrant
from .._interfaces import InspectedPage
from .._models import Experience

__all__ = ["DATA_ISLAND_ID", "Assets", "PageState", "overlay_data", "page_markup", "server_timing"]

DATA_ISLAND_ID = "pz-overlay-data"
_MAX_DESC = 120


@dataclass(frozen=True, slots=True)
class Assets:
    """Where the tools' files are (under the tracking prefix) and their hashes."""

    prefix: str
    script_path: str
    script_hash: str
    style_path: str
    style_hash: str
    #: How tracking names an experience in its tokens (the overlay counts events by it).
    experience_part: Callable[[Experience], str] | None = None


@dataclass(frozen=True, slots=True)
class PageState:
    """What one request's tools are: see ``DevSession``."""

    assets: Assets
    preview: PreviewGrant | None
    qa: QAGrant | None
    overlay: bool
    here: str


def overlay_data(session: PageState, page: InspectedPage) -> dict[str, Any]:
    """What the overlay shows: one row per experience key the page asked for."""
    part = session.assets.experience_part if page.tracking is not None else None
    rows = []
    for key, decision in page.decisions.items():
        experience = page.experience(key)
        context: Mapping[str, Any] = experience.experience_context if experience else {}
        rows.append(
            {
                "key": key,
                "name": _text(context.get("experience")),
                "variation": _text(context.get("moe_variation_id")),
                "audience": _text(context.get("audience_name")),
                **decision.as_dict(),
                "track": part(experience) if part is not None and experience else None,
            }
        )
    preview = session.preview
    return {
        "experiences": rows,
        "waited_ms": round(page.waited_ms, 1),
        "preview": preview.label if preview is not None else None,
        "qa": (session.qa.label or "QA") if session.qa is not None else None,
        "tracking": page.tracking is not None,
    }


def page_markup(
    session: PageState, page: InspectedPage, nonce: str | None, root_path: str
) -> Markup:
    tools = session.assets
    nonce_attr = f' nonce="{_esc(nonce)}"' if nonce else ""
    parts: list[str] = []
    if session.preview is not None or session.overlay:
        parts.append(
            f'<link rel="stylesheet" href="{_esc(root_path + tools.style_path)}" '
            f'integrity="{_esc(tools.style_hash)}"{nonce_attr}>'
        )
    if session.preview is not None:
        parts.append(_banner(session, root_path))
    if session.overlay:
        data = htmlsafe_json_dumps(overlay_data(session, page))
        parts.append(
            f'<script type="application/json" id="{DATA_ISLAND_ID}">{data}</script>'
            f'<script defer src="{_esc(root_path + tools.script_path)}" '
            f'integrity="{_esc(tools.script_hash)}"{nonce_attr}></script>'
        )
    return Markup("".join(parts))  # noqa: S704 - every value above is escaped


def _banner(session: PageState, root_path: str) -> str:
    preview = session.preview
    assert preview is not None
    exit_url = (
        root_path + session.assets.prefix + "/preview/exit?" + urlencode({"next": session.here})
    )
    until = datetime.fromtimestamp(preview.expires, UTC).strftime("%H:%M UTC")
    return (
        '<div id="pz-preview-banner" class="pz-preview-banner" role="status">'
        f"Preview as <strong>{_esc(preview.label)}</strong> "
        f'<span class="pz-preview-until">until {until}: no impressions or clicks are '
        "sent</span> "
        f'<a class="pz-preview-exit" href="{_esc(exit_url)}">Exit preview</a></div>'
    )


def server_timing(page: InspectedPage) -> bytes:
    """``personalize;dur=<ms waited>;desc="<sources>"``: sources in the order first
    seen, a default or stale answer with its reason (``cache+default:timeout``)."""
    desc = page.sources or "none"
    if len(desc) > _MAX_DESC:
        desc = desc[: _MAX_DESC - 3] + "..."
    # Sources and reasons are our own [a-z_:+] words: nothing to quote inside the string.
    return f'personalize;dur={page.waited_ms:.1f};desc="{desc}"'.encode("ascii")


def _text(value: object) -> str | None:
    return None if value is None else str(value)[:200]


def _esc(value: object) -> str:
    return str(escape(value))
