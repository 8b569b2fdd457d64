"""Validate requests and responses against the published MoEngage Personalize spec.

The spec is vendored at ``tests/spec/moengage-personalize-openapi.yml`` (a copy of
``shared/reference/``) so a clean clone validates without anything beside it. It is loaded
once with openapi-core, with the two quirks WIRE.md describes patched in memory.

Reusable API::

    validate_request(request: httpx.Request, *, workspace_id=None, api_secret=None)
    validate_request_parts(method, url, headers, body, *, workspace_id=None, api_secret=None)
    validate_response(method, path, status, body, *, content_type="application/json")
    iter_request_examples()  -> Iterator[SpecExample]   (status is None)
    iter_response_examples() -> Iterator[SpecExample]
    spec_dict()              -> the patched spec as a dict (do not mutate)

Every failure raises ``SpecViolation`` (an ``AssertionError``) naming what broke.
"""

from __future__ import annotations

import base64
import binascii
import copy
import functools
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
import yaml
from openapi_core import OpenAPI
from openapi_core.testing import MockRequest, MockResponse

__all__ = [
    "SPEC_PATH",
    "SpecExample",
    "SpecViolation",
    "iter_request_examples",
    "iter_response_examples",
    "spec_dict",
    "validate_request",
    "validate_request_parts",
    "validate_response",
]

SPEC_PATH = Path(__file__).resolve().parents[1] / "spec" / "moengage-personalize-openapi.yml"

# Requests are validated as if they went to the spec's own server, wherever they really
# went (a MockTransport, a stand-in on 127.0.0.1, a proxy): only the part of the path from
# "/experiences/" on is the API's.
_SPEC_HOST = "https://sdk-01.moengage.com"
_SPEC_BASE_PATH = "/v1"
_METHODS = ("get", "post", "put", "patch", "delete")


class SpecViolation(AssertionError):
    """A request or response does not conform to the (patched) published spec."""


@dataclass(frozen=True)
class SpecExample:
    """One example from the spec: ``path`` like ``/experiences/fetch``, ``method`` upper
    case, ``status`` the response code (``None`` for request examples)."""

    method: str
    path: str
    status: int | None
    name: str
    body: Any

    @property
    def id(self) -> str:
        """A readable pytest id."""
        status = "" if self.status is None else f" {self.status}"
        return f"{self.method} {self.path}{status} {self.name}"


@functools.cache
def _raw_spec() -> dict[str, Any]:
    with SPEC_PATH.open(encoding="utf-8") as f:
        data = yaml.safe_load(f)
    assert isinstance(data, dict)
    return data


@functools.cache
def spec_dict() -> dict[str, Any]:
    """The spec with WIRE.md's two quirks patched; cached, so treat it as read-only."""
    spec = copy.deepcopy(_raw_spec())
    fetch_body = spec["paths"]["/experiences/fetch"]["post"]["requestBody"]["content"][
        "application/json"
    ]["schema"]
    identifiers = fetch_body["properties"]["identifiers"]["properties"]
    # Quirk 1: the spec types user_identifiers as a string, yet every example (here and in
    # the public docs) sends an object such as {"u_em": ..., "u_mb": ...}, and so do we.
    identifiers["user_identifiers"] = {
        "type": "object",
        "additionalProperties": {"type": "string"},
        "description": identifiers["user_identifiers"].get("description", ""),
    }
    events_action = spec["paths"]["/experiences/events"]["post"]["requestBody"]["content"][
        "application/json"
    ]["schema"]["properties"]["elements"]["items"]["properties"]["actions"]["items"]
    # Quirk 2: the schema puts b_id beside `attributes`, but the spec's own click examples
    # put it inside, which is what we send. `attributes` already allows extra properties;
    # declaring b_id there makes a non-string b_id fail validation instead of slipping by.
    events_action["properties"]["attributes"]["properties"]["b_id"] = copy.deepcopy(
        events_action["properties"]["b_id"]
    )
    return spec


@functools.cache
def _openapi() -> OpenAPI:
    return OpenAPI.from_dict(spec_dict())


def _api_path(path: str) -> str:
    index = path.find("/experiences/")
    if index < 0:
        raise SpecViolation(f"{path!r} is not a Personalize API path")
    return path[index:]


def _describe(exc: Exception) -> str:
    parts = [f"{type(exc).__name__}: {exc}"]
    cause = exc.__cause__
    while cause is not None:
        parts.append(f"{type(cause).__name__}: {cause}")
        for error in getattr(cause, "schema_errors", ()):
            parts.append(f"  - {getattr(error, 'message', error)}")
        cause = cause.__cause__
    return "\n".join(parts)


def _check_auth(
    headers: Mapping[str, str], workspace_id: str | None, api_secret: str | None
) -> None:
    lower = {k.lower(): v for k, v in headers.items()}
    auth = lower.get("authorization", "")
    scheme, _, encoded = auth.partition(" ")
    if scheme != "Basic" or not encoded:
        raise SpecViolation("Authorization header is not 'Basic <base64>'")
    try:
        decoded = base64.b64decode(encoded, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise SpecViolation("Authorization credentials are not valid base64 UTF-8") from exc
    user, colon, password = decoded.partition(":")
    if not colon or not user or not password:
        raise SpecViolation("Authorization credentials are not 'workspace_id:secret'")
    if lower.get("moe-appkey") != user:
        raise SpecViolation("MOE-APPKEY header is missing or differs from the Basic user")
    if workspace_id is not None and user != workspace_id:
        raise SpecViolation("Basic auth user is not the configured workspace id")
    if api_secret is not None and password != api_secret:
        # Deliberately vague: an assertion message is not a place for secrets either.
        raise SpecViolation("Basic auth password is not the configured API secret")


def validate_request_parts(
    method: str,
    url: str,
    headers: Mapping[str, str],
    body: bytes | None,
    *,
    workspace_id: str | None = None,
    api_secret: str | None = None,
) -> None:
    """Validate one request given as parts (handy on the server side of a stand-in).

    Checks the operation exists, parameters and the JSON body match the schemas, and the
    Basic auth / ``MOE-APPKEY`` pair is coherent (and equal to ``workspace_id`` /
    ``api_secret`` when given).
    """
    split = urlsplit(url)
    _check_auth(headers, workspace_id, api_secret)
    content_type = next((v for k, v in headers.items() if k.lower() == "content-type"), "")
    if body:
        if content_type.split(";")[0].strip().lower() != "application/json":
            raise SpecViolation(f"a request body must be application/json, got {content_type!r}")
        try:
            json.loads(body)
        except ValueError as exc:
            raise SpecViolation("request body is not JSON") from exc
    request = MockRequest(
        _SPEC_HOST,
        method,
        _SPEC_BASE_PATH + _api_path(split.path),
        args=dict(parse_qsl(split.query, keep_blank_values=True)),
        headers=dict(headers),
        data=body or b"",
        content_type=content_type.lower() or "application/json",
    )
    try:
        _openapi().validate_request(request)
    except Exception as exc:
        raise SpecViolation(f"{method} {split.path}: {_describe(exc)}") from exc


def validate_request(
    request: httpx.Request, *, workspace_id: str | None = None, api_secret: str | None = None
) -> None:
    """Validate an ``httpx.Request`` (e.g. inside a ``MockTransport`` handler)."""
    validate_request_parts(
        request.method,
        str(request.url),
        dict(request.headers),
        request.content,
        workspace_id=workspace_id,
        api_secret=api_secret,
    )


def validate_response(
    method: str,
    path: str,
    status: int,
    body: Any,
    *,
    content_type: str = "application/json",
) -> None:
    """Validate a response body (bytes, or a JSON-able value) for ``method path status``."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = MockRequest(_SPEC_HOST, method, _SPEC_BASE_PATH + _api_path(path))
    response = MockResponse(data, status_code=status, content_type=content_type)
    try:
        _openapi().validate_response(request, response)
    except Exception as exc:
        raise SpecViolation(f"{method} {path} -> {status}: {_describe(exc)}") from exc


def _media_examples(media: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
    if "example" in media:
        yield "example", media["example"]
    for name, example in (media.get("examples") or {}).items():
        yield name, example["value"]


def _operations() -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in spec_dict()["paths"].items():
        for method in _METHODS:
            if method in item:
                yield path, method.upper(), item[method]


def iter_request_examples() -> Iterator[SpecExample]:
    """Every request body example in the spec (schema-level ``example`` included)."""
    for path, method, operation in _operations():
        media = (operation.get("requestBody") or {}).get("content", {}).get("application/json")
        if not media:
            continue
        if "example" in media.get("schema", {}):
            yield SpecExample(method, path, None, "schema example", media["schema"]["example"])
        for name, value in _media_examples(media):
            yield SpecExample(method, path, None, name, value)


def iter_response_examples() -> Iterator[SpecExample]:
    """Every response body example in the spec, per endpoint and status."""
    for path, method, operation in _operations():
        for status, response in operation.get("responses", {}).items():
            media = response.get("content", {}).get("application/json")
            if not media:
                continue
            for name, value in _media_examples(media):
                yield SpecExample(method, path, int(status), name, value)
