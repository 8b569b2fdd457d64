"""Developer tools: preview links, QA cookies, the debug overlay, ``Server-Timing``.

- ``_tools``: ``DevTools`` (the middleware's: settings, grant cookies, its endpoints under
  the tracking prefix) and ``DevSession`` (one request's: a ``PageTools``);
- ``_overlay``: the banner and overlay markup, the ``Server-Timing`` value;
- ``static/``: ``overlay.js`` and ``devtools.css``.

The signed grants themselves (``preview_link``, ``qa_link``) are core (``_grants``):
the CLI and the request handle use them too. See ``docs/preview.md``.
"""

from __future__ import annotations

from ._overlay import DATA_ISLAND_ID, overlay_data, server_timing
from ._tools import DevSession, DevTools

__all__ = ["DATA_ISLAND_ID", "DevSession", "DevTools", "overlay_data", "server_timing"]
