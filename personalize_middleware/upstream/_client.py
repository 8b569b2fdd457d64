"""The HTTP client for the three MoEngage Personalize endpoints.

One ``PersonalizeClient`` owns one ``httpx.AsyncClient`` (pooled keep-alive connections)
for its whole life: create it at application start-up, close it at shutdown. Every httpx
failure and every non-2xx answer is translated into the ``APIError`` tree in one place,
``_translate_transport_error`` / ``_error_for_status``, where text from outside (error
bodies, headers, httpx messages) is redacted and bounded (``_redact``).

Longer than ~400 lines because the three endpoints share that one boundary with httpx
(the overall deadline, the error translation and redaction, the telemetry of every call).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import Coroutine, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar

import httpx

from .._config import PersonalizeSettings, mask_secret
from .._contract import (
    EVENTS_BATCH_SIZE,
    FETCH_BATCH_SIZE,
    attributes_body,
    identifiers_body,
    statuses_query,
    unique_keys,
)
from .._exceptions import (
    APIError,
    AuthenticationError,
    BadRequestError,
    ClientClosedError,
    ConfigurationError,
    MalformedResponseError,
    RateLimitedError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
)
from .._fork import abandon, register
from .._interfaces import Telemetry
from .._models import EventElement, Experience, ExperienceMetadata
from .._redact import Redactor, protect_library_logs
from .._retry import parse_retry_after
from .._version import __version__

__all__ = ["KEEPALIVE_EXPIRY", "PersonalizeClient"]

logger = logging.getLogger("personalize_middleware.client")

#: Seconds an idle pooled connection is kept; short enough that the far end (or a load
#: balancer in between) has not silently dropped it yet.
KEEPALIVE_EXPIRY = 5.0

FETCH_ENDPOINT = "POST /experiences/fetch"
METADATA_ENDPOINT = "GET /experiences/metadata"
EVENTS_ENDPOINT = "POST /experiences/events"


_T = TypeVar("_T")


class PersonalizeClient:
    """Async client for MoEngage Personalize; implements ``PersonalizeBackend``.

    Use it as an async context manager (or call ``aclose()``)::

        async with PersonalizeClient(PersonalizeSettings.from_env()) as client:
            experiences = await client.fetch_experiences(["homepage-banner"], customer_id="u1")

    ``transport`` replaces the network (``httpx.MockTransport`` in tests); connection
    limits then belong to that transport. Argument mistakes raise ``ConfigurationError``
    (a ``ValueError``); everything the API or the network did raises an ``APIError``.
    """

    def __init__(
        self,
        settings: PersonalizeSettings,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if not isinstance(settings, PersonalizeSettings):
            raise ConfigurationError("settings must be a PersonalizeSettings", field="settings")
        self._settings = settings
        base = settings.api_base_url
        self._fetch_url = base + "/experiences/fetch"
        self._metadata_url = base + "/experiences/metadata"
        self._events_url = base + "/experiences/events"
        credentials = f"{settings.workspace_id}:{settings.api_secret}".encode()
        self._auth_token = base64.b64encode(credentials).decode("ascii")
        # Scrubs text that came from outside (error bodies, headers, httpx messages)
        # before it reaches an exception or a log line: snippet() for our messages,
        # scrub_exception() for what we chain, a filter on httpx's / httpcore's logs.
        self._redactor = Redactor.for_credentials(settings.workspace_id, settings.api_secret)
        protect_library_logs(self._redactor)
        self._transport = transport
        self._http = self._new_http()
        self._closed = False
        register(self)
        #: Seconds a whole call may take, however the time is spent.
        self._deadline = settings.connect_timeout + settings.read_timeout
        #: Told of every call (``PersonalizeMiddleware(telemetry=...)``).
        self.telemetry: Telemetry | None = None

    def _new_http(self) -> httpx.AsyncClient:
        settings = self._settings
        return httpx.AsyncClient(
            headers={
                "Authorization": f"Basic {self._auth_token}",
                "MOE-APPKEY": settings.workspace_id,
                "User-Agent": f"personalize-middleware/{__version__}",
                "Content-Type": "application/json",
                "Accept": "application/json",
            },
            timeout=httpx.Timeout(
                connect=settings.connect_timeout,
                read=settings.read_timeout,
                write=settings.read_timeout,
                pool=settings.connect_timeout,
            ),
            limits=httpx.Limits(
                max_connections=settings.max_connections,
                max_keepalive_connections=settings.max_connections,
                keepalive_expiry=KEEPALIVE_EXPIRY,
            ),
            transport=self._transport,
            follow_redirects=False,
        )

    def __repr__(self) -> str:
        return (
            f"PersonalizeClient(workspace_id={self._settings.workspace_id!r}, "
            f"api_secret={mask_secret(self._settings.api_secret)!r}, "
            f"base_url={self._settings.api_base_url!r}, closed={self._closed})"
        )

    @property
    def settings(self) -> PersonalizeSettings:
        return self._settings

    @property
    def is_closed(self) -> bool:
        return self._closed

    async def __aenter__(self) -> Self:
        """Entering a closed client reopens it with a new connection pool (an app's
        lifespan may run more than once, e.g. one test client after another)."""
        if self._closed:
            self._http = self._new_http()
            self._closed = False
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the pooled connections. Safe to call twice."""
        self._closed = True
        await self._http.aclose()

    def reset_after_fork(self) -> None:
        """In a forked child (``_fork``): the parent's pool and its sockets are left alone;
        this process gets a pool of its own."""
        abandon(self._http)
        self._http = self._new_http()

    # -- Fetch Experience -----------------------------------------------------------------

    async def fetch_experiences(
        self,
        keys: Iterable[str],
        *,
        customer_id: str | None = None,
        user_identifiers: Mapping[str, str] | None = None,
        attributes: Mapping[str, Any] | None = None,
    ) -> dict[str, Experience]:
        """Fetch the experiences ``keys`` for one user.

        Duplicate keys are sent once; more than 25 keys go out as concurrent calls of at
        most 25 whose answers are merged. A key the user does not match is simply absent
        from the result. No keys: no call, ``{}``. ``attributes`` (in-session attributes
        such as ``DAY_OF_THE_WEEK`` or ``utm_medium``) become top-level body fields.
        """
        wanted = unique_keys(keys)
        identifiers = identifiers_body(customer_id, user_identifiers)
        extra = attributes_body(attributes)
        if not wanted:
            return {}
        bodies = [
            _dump({"identifiers": identifiers, "experience_key": chunk, **extra}, "attributes")
            for chunk in _chunks(wanted, FETCH_BATCH_SIZE)
        ]
        if len(bodies) == 1:
            return await self._fetch_one(bodies[0])
        merged: dict[str, Experience] = {}
        for part in await _all_or_first_error([self._fetch_one(b) for b in bodies]):
            merged.update(part)
        return merged

    async def _fetch_one(self, body: bytes) -> dict[str, Experience]:
        data = await self._call(FETCH_ENDPOINT, "POST", self._fetch_url, body)
        experiences = data.get("experiences") if isinstance(data, dict) else None
        if not isinstance(experiences, dict):
            raise MalformedResponseError(
                f"{FETCH_ENDPOINT}: answer has no 'experiences' object",
                status_code=200,
                endpoint=FETCH_ENDPOINT,
            )
        result: dict[str, Experience] = {}
        for key, item in experiences.items():
            try:
                result[key] = Experience.from_api(key, item)
            except ValueError as exc:
                raise self._wrong_shape(FETCH_ENDPOINT, exc) from self._clean_cause(exc)
        return result

    # -- Fetch Experience Metadata --------------------------------------------------------

    async def fetch_metadata(
        self, statuses: Iterable[str] | None = None
    ) -> list[ExperienceMetadata]:
        """List the workspace's experiences, optionally only those with ``statuses``.

        ``statuses`` are ``Active``, ``Paused``, ``Scheduled`` (case-sensitive: the API
        answers an empty list to ``active``, so a wrong case is refused here). ``None`` or
        an empty iterable: every status. A single string may hold comma-separated values.
        """
        url = self._metadata_url
        wanted = statuses_query(statuses)
        if wanted:
            # Fixed vocabulary, so nothing to escape; the API wants a literal comma.
            url += "?status=" + ",".join(wanted)
        data = await self._call(METADATA_ENDPOINT, "GET", url, None)
        metadata = data.get("metadata") if isinstance(data, dict) else None
        entries = metadata.get("experiences") if isinstance(metadata, dict) else None
        if not isinstance(entries, list):
            raise MalformedResponseError(
                f"{METADATA_ENDPOINT}: answer has no 'metadata.experiences' list",
                status_code=200,
                endpoint=METADATA_ENDPOINT,
            )
        try:
            return [ExperienceMetadata.from_api(entry) for entry in entries]
        except ValueError as exc:
            raise self._wrong_shape(METADATA_ENDPOINT, exc) from self._clean_cause(exc)

    # -- Track Experience Events ----------------------------------------------------------

    async def track_events(self, elements: Sequence[EventElement]) -> None:
        """Report impressions and clicks, in calls of at most 100 elements.

        The calls go out one after the other: when one fails, the earlier ones were
        delivered and the later ones were not sent. Sending the whole sequence again is
        safe, since MoEngage deduplicates on each action's ``moe_event_uuid``; a caller
        that needs to know which element a 400 was about sends at most 100 at a time.
        """
        if isinstance(elements, Mapping | str | bytes):
            raise ConfigurationError(
                "elements must be a sequence of event elements", field="elements"
            )
        for chunk in _chunks(list(elements), EVENTS_BATCH_SIZE):
            body = _dump({"elements": chunk}, "elements")
            data = await self._call(EVENTS_ENDPOINT, "POST", self._events_url, body)
            if not isinstance(data, dict):
                raise MalformedResponseError(
                    f"{EVENTS_ENDPOINT}: answer is not a JSON object",
                    status_code=200,
                    endpoint=EVENTS_ENDPOINT,
                )

    # -- the one boundary with httpx ------------------------------------------------------

    async def _call(self, endpoint: str, method: str, url: str, body: bytes | None) -> Any:
        telemetry = self.telemetry
        if telemetry is None:
            return await self._request(endpoint, method, url, body)
        call = telemetry.upstream_call_started(endpoint)
        started = time.perf_counter()
        status: int | None = 200
        error: BaseException | None = None
        try:
            return await self._request(endpoint, method, url, body)
        except BaseException as exc:
            error, status = exc, getattr(exc, "status_code", None)
            raise
        finally:
            seconds = time.perf_counter() - started
            telemetry.upstream_call_finished(call, endpoint, seconds, status, error)

    async def _request(self, endpoint: str, method: str, url: str, body: bytes | None) -> Any:
        if self._closed:
            raise ClientClosedError("PersonalizeClient is closed")
        started = time.perf_counter()
        try:
            # httpx's timeouts are per operation: an upstream trickling a byte more often
            # than read_timeout would hold the call, and a pooled connection, for as long as
            # it liked. One overall deadline bounds every call.
            async with asyncio.timeout(self._deadline):
                response = await self._http.request(method, url, content=body)
        except httpx.HTTPError as exc:
            raise self._translate_transport_error(endpoint, exc) from self._clean_cause(exc)
        except TimeoutError as exc:
            raise UpstreamTimeoutError(
                f"{endpoint}: no complete answer within {self._deadline:g}s", endpoint=endpoint
            ) from exc
        elapsed_ms = (time.perf_counter() - started) * 1000
        logger.debug(
            "personalize: %s -> HTTP %d in %.1f ms", endpoint, response.status_code, elapsed_ms
        )
        if not 200 <= response.status_code < 300:
            raise self._error_for_status(endpoint, response)
        return self._parse_json(endpoint, response)

    def _parse_json(self, endpoint: str, response: httpx.Response) -> Any:
        status = response.status_code
        content = response.content
        if not content.strip():
            raise MalformedResponseError(
                f"{endpoint}: empty answer (HTTP {status})", status_code=status, endpoint=endpoint
            )
        try:
            return json.loads(content)
        except (ValueError, RecursionError) as exc:
            content_type = self._redactor.snippet(response.headers.get("Content-Type", "unknown"))
            raise MalformedResponseError(
                f"{endpoint}: answer is not JSON (HTTP {status}, {content_type})",
                status_code=status,
                endpoint=endpoint,
            ) from self._clean_cause(exc)

    def _translate_transport_error(self, endpoint: str, exc: httpx.HTTPError) -> APIError:
        detail = self._redactor.snippet(f"{type(exc).__name__}: {exc}".rstrip(": "))
        logger.debug("personalize: %s failed: %s", endpoint, detail)
        if isinstance(exc, httpx.TimeoutException):
            return UpstreamTimeoutError(f"{endpoint}: timed out ({detail})", endpoint=endpoint)
        if isinstance(exc, httpx.DecodingError):
            return MalformedResponseError(
                f"{endpoint}: undecodable answer ({detail})", endpoint=endpoint
            )
        return UpstreamUnavailableError(f"{endpoint}: unreachable ({detail})", endpoint=endpoint)

    def _error_for_status(self, endpoint: str, response: httpx.Response) -> APIError:
        status = response.status_code
        title, description, code = self._error_fields(response)
        message = f"{endpoint} answered HTTP {status}"
        if title or description:
            message += ": " + " - ".join(p for p in (title, description) if p)
        if status in (401, 403):
            return AuthenticationError(
                message + " (check the workspace id and the Personalize API secret)",
                status_code=status,
                endpoint=endpoint,
            )
        if status == 400:
            return BadRequestError(
                message, endpoint=endpoint, title=title, description=description, code=code
            )
        if status == 429:
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
            return RateLimitedError(message, endpoint=endpoint, retry_after=retry_after)
        if status == 408:
            return UpstreamTimeoutError(message, status_code=status, endpoint=endpoint)
        if status >= 500:
            return UpstreamUnavailableError(message, status_code=status, endpoint=endpoint)
        return APIError(message, status_code=status, endpoint=endpoint)

    def _error_fields(self, response: httpx.Response) -> tuple[str | None, str | None, str | None]:
        """The API's ``title`` / ``description`` / ``code`` as redacted snippets, when the
        error body has them."""
        try:
            data = json.loads(response.content)
        except (ValueError, RecursionError):
            data = None

        def text(name: str) -> str | None:
            value = data.get(name) if isinstance(data, dict) else None
            return (self._redactor.snippet(value) or None) if isinstance(value, str) else None

        return text("title"), text("description"), text("code")

    def _wrong_shape(self, endpoint: str, exc: ValueError) -> MalformedResponseError:
        """A 200 answer the models refused; their reason may quote the answer."""
        message = f"{endpoint}: {self._redactor.snippet(str(exc))}"
        return MalformedResponseError(message, status_code=200, endpoint=endpoint)

    def _clean_cause(self, exc: BaseException) -> BaseException | None:
        """``exc`` redacted in place for ``raise ... from``; ``None`` if that failed."""
        return exc if self._redactor.scrub_exception(exc) else None


# -- helpers (pure functions) ---------------------------------------------------------------


def _dump(body: dict[str, Any], field: str) -> bytes:
    try:
        return json.dumps(body, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"{field} is not JSON-serialisable: {exc}", field=field) from exc


def _chunks(items: list[_T], size: int) -> list[list[_T]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


async def _all_or_first_error(calls: list[Coroutine[Any, Any, _T]]) -> list[_T]:
    """Run ``calls`` concurrently; the first failure cancels the rest and is raised as is
    (not wrapped in an ``ExceptionGroup``, so callers catch ``APIError`` as usual)."""
    first_error: BaseException | None = None
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(call) for call in calls]
    except BaseExceptionGroup as failed:
        first_error = failed.exceptions[0]
    if first_error is not None:
        # Raised outside the except block so its own __cause__ (the httpx error) stays.
        raise first_error
    return [task.result() for task in tasks]
