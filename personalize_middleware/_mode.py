"""Which backend the middleware runs on, and who may see the report.

MoEngage when ``settings`` are given or ``MOENGAGE_WORKSPACE_ID`` and
``MOENGAGE_API_SECRET`` are set; local mode (the embedded engine on a local experiences
file) only when no ``MOENGAGE_*`` variable is set at all: a half-configured environment is
an error, never a silent switch to sample content. The report is on in local mode, and
with MoEngage only when asked for and behind an ``authorize(request)`` guard.
"""

from __future__ import annotations

import inspect
import logging
import os
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from ._config import PersonalizeSettings, invalid_option
from ._exceptions import ConfigurationError
from ._interfaces import PersonalizeBackend
from ._options import ReportGuard, ResolvedOptions
from .local import LocalBackend, ReportSource, local_report_app, sample_file_path
from .upstream import MetadataWatcher

__all__ = [
    "Mode",
    "choose_backend",
    "local_mode_warning",
    "metadata_watcher",
    "report_access",
    "report_app",
]

logger = logging.getLogger("personalize_middleware")


@dataclass(frozen=True, slots=True)
class Mode:
    backend: PersonalizeBackend
    #: The connection settings when the middleware built the HTTP client.
    settings: PersonalizeSettings | None
    #: Local mode: the experiences file the engine evaluates; else ``None``.
    local_source: str | None
    #: ``False`` for a ``backend=`` the app passed (the app opens and closes it).
    owns_backend: bool


def choose_backend(options: ResolvedOptions) -> Mode:
    if options.backend is not None:
        return Mode(options.backend, None, None, owns_backend=False)
    settings = options.settings
    if settings is None:
        settings = PersonalizeSettings.from_env_if_configured()
        if settings is not None and options.local_experiences is not None:
            raise invalid_option(
                "local_experiences",
                options.local_experiences,
                "no local file while MOENGAGE_WORKSPACE_ID and MOENGAGE_API_SECRET are set "
                "(unset them for local mode)",
            )
    if settings is not None:
        from .upstream import PersonalizeClient

        return Mode(PersonalizeClient(settings), settings, None, owns_backend=True)
    if options.local_experiences is None:
        return Mode(LocalBackend.default(), None, sample_file_path(), owns_backend=True)
    path = os.fspath(options.local_experiences)
    try:
        local = LocalBackend(path)
    except ConfigurationError as exc:
        detail = str(exc).removeprefix(f"{path}: ")
        if not os.path.exists(path):
            where = "" if os.path.isabs(path) else f" in {os.getcwd()}"
            detail = f"no such file{where}; expected a .json or .yaml experiences file"
        raise ConfigurationError(
            f"local_experiences={path!r}: {detail}", field="local_experiences"
        ) from exc
    return Mode(local, None, path, owns_backend=True)


def report_access(
    report: bool | ReportGuard | None, backend: PersonalizeBackend, *, local_mode: bool
) -> tuple[ReportGuard | None, bool]:
    """(guard, shown). Off by default with MoEngage; on with it only behind a guard."""
    if report is None:
        return None, local_mode
    if report is False:
        return None, False
    guard = None if report is True else report
    if guard is None and not isinstance(backend, ReportSource):
        raise invalid_option(
            "report",
            True,
            "an authorize(request) function with MoEngage credentials (report=True would "
            "show every visitor the report), or False",
        )
    return guard, True


def local_mode_warning(source: str | None, report_path: str | None) -> str:
    return (
        "personalize: LOCAL MODE (no MOENGAGE_WORKSPACE_ID / MOENGAGE_API_SECRET set): "
        f"experiences from {source}; report at {report_path or '(off)'}. Set both variables "
        "to use MoEngage."
    )


def report_app(source: ReportSource, guard: ReportGuard | None) -> ASGIApp:
    """The report of ``source``; behind ``guard(request)`` when there is one (403 when it
    says no or fails)."""
    inner = local_report_app(source)
    if guard is None:
        return inner

    async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            allowed = guard(Request(scope))
            if inspect.isawaitable(allowed):
                allowed = await allowed
        except Exception:
            logger.exception("personalize: the report's authorize() failed; denying")
            allowed = False
        if not allowed:
            await PlainTextResponse("Forbidden", status_code=403)(scope, receive, send)
            return
        await inner(scope, receive, send)

    return guarded


def metadata_watcher(
    backend: PersonalizeBackend,
    keys: tuple[str, ...],
    interval: float | None,
    local_source: str | None,
) -> MetadataWatcher | None:
    """The metadata refresher (``None`` when ``metadata_refresh`` is off); its log lines
    name where keys come from: the local file, or the workspace."""
    if not interval:
        return None
    source = (
        f"the local experiences file {local_source}"
        if local_source is not None
        else "the workspace"
    )
    return MetadataWatcher(backend, keys, interval=interval, source=source)
