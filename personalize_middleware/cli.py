"""Command line: ``personalize-middleware`` / ``python -m personalize_middleware``.

::

    serve-local   run the MoEngage-compatible local server on a local experiences file
    experiences   list experiences (MoEngage when MOENGAGE_* is set, else the local file)
    fetch         show what one user gets for some experience keys
    check         compare an app's configured keys with the workspace's experiences;
                  --templates DIR: find payload values where escaping cannot help
    preview       a signed link: see the site as a customer or an audience would
    qa-cookie     a signed link and cookie: the debug overlay and Server-Timing
    refresh       make every process sharing the Redis re-read experience statuses now

``experiences``, ``fetch`` and ``check`` talk to the real API when
``MOENGAGE_WORKSPACE_ID`` and ``MOENGAGE_API_SECRET`` are set (``MOENGAGE_BASE_URL`` and
``MOENGAGE_DATA_CENTER`` honoured) unless ``--file`` names a local experiences file;
otherwise they use the packaged sample file. Errors are one line on stderr and exit 1.

``check --templates DIR`` (alone or with a key source) prints ``file:line: message`` for
each payload value placed in ``href`` / ``src`` / ``action`` (and the other URL
attributes) without the ``url`` reader, in ``style`` or an ``on*`` event handler, in an
unquoted attribute value, inside a tag or inside ``<script>`` without ``tojson``; any
warning makes the exit status 1, so CI can run it.

Longer than ~400 lines because each command's arguments, sources and output read best
side by side in one place; the work itself lives in the packages (the template scan in
``jinja``, the backends in ``upstream`` and ``local``).
"""

from __future__ import annotations

import argparse
import asyncio
import difflib
import importlib
import json
import os
import socket
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from ._cli_devtools import add_commands as add_devtools_commands
from ._config import PersonalizeSettings
from ._exceptions import PersonalizeError
from ._interfaces import PersonalizeBackend
from ._models import EXPERIENCE_STATUSES, ExperienceMetadata

if TYPE_CHECKING:
    from .local import LocalBackend

__all__ = ["main"]

PROG = "personalize-middleware"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8787
DEFAULT_WORKSPACE_ID = "LOCALWORKSPACE"
# Not a secret: the documented default of a server that only ever runs on a developer box.
DEFAULT_API_SECRET = "local-secret"  # noqa: S105
_MAX_APP_DEPTH = 64


class CommandError(Exception):
    """A user mistake the CLI reports as one line (never a traceback)."""


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 1 error or failed check, 2 bad usage)."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help and on usage errors
        return exc.code if isinstance(exc.code, int) else 2
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except KeyboardInterrupt:
        return 130
    except (CommandError, PersonalizeError, OSError) as exc:
        _fail(str(exc) or type(exc).__name__)
    except Exception as exc:  # the promise is "never a traceback", whatever went wrong
        _fail(f"unexpected {type(exc).__name__}: {exc}")
    return 1


def _fail(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="MoEngage Personalize for Starlette and FastAPI: local tools."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve-local", help="run the MoEngage-compatible local server on a local experiences file"
    )
    _add_file(serve)
    serve.add_argument("--host", default=DEFAULT_HOST, help=f"default {DEFAULT_HOST}")
    serve.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}; 0 picks one"
    )
    serve.add_argument(
        "--workspace-id", default=DEFAULT_WORKSPACE_ID, help=f"default {DEFAULT_WORKSPACE_ID}"
    )
    serve.add_argument(
        "--api-secret", default=DEFAULT_API_SECRET, help=f"default {DEFAULT_API_SECRET!r}"
    )
    serve.add_argument("--events-log", help="append tracked events to this JSON Lines file")
    serve.set_defaults(handler=_serve_local)

    experiences = commands.add_parser("experiences", help="list experiences and their status")
    _add_file(experiences)
    experiences.add_argument(
        "--status",
        nargs="+",
        metavar="STATUS",
        help="only these statuses: Active, Paused, Scheduled (comma-separated works too)",
    )
    experiences.set_defaults(handler=_experiences)

    fetch = commands.add_parser("fetch", help="show what one user gets for experience keys")
    _add_file(fetch)
    fetch.add_argument("--customer-id", help="the user's customer_id")
    fetch.add_argument("--email", help="the user's email (sent as user_identifiers.u_em)")
    fetch.add_argument(
        "--attr",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an in-session attribute, e.g. utm_medium=email or USER_AGENT=...; "
        "DAY_OF_THE_WEEK and TIME_OF_THE_DAY default to now (UTC)",
    )
    fetch.add_argument("--json", action="store_true", help="print the raw wire answer as JSON")
    fetch.add_argument("keys", nargs="+", metavar="KEY", help="experience keys")
    fetch.set_defaults(handler=_fetch)

    check = commands.add_parser(
        "check",
        help="check configured experience keys against the workspace's experiences, "
        "and/or templates for unsafe payload values",
    )
    _add_file(check)
    # Not required as a group: --templates alone is a check too (see _check).
    source = check.add_mutually_exclusive_group()
    source.add_argument(
        "--app",
        metavar="MODULE:ATTR",
        help="an app using PersonalizeMiddleware, the middleware, or a list/dict of keys",
    )
    source.add_argument("--keys-file", help="a file of keys: one per line, or a JSON list/dict")
    source.add_argument("--keys", nargs="+", metavar="KEY", help="the keys themselves")
    check.add_argument(
        "--strict", action="store_true", help="also fail on keys that are Paused or Scheduled"
    )
    check.add_argument(
        "--templates",
        nargs="+",
        metavar="DIR",
        help="template directories or files: warn where a payload value sits in href/src/"
        "action/style/on* without the url reader (any warning: exit status 1)",
    )
    check.set_defaults(handler=_check, usage=check.format_usage)
    add_devtools_commands(commands)  # preview, qa-cookie

    refresh = commands.add_parser(
        "refresh",
        help="tell every process sharing the Redis to re-read experience statuses now",
    )
    refresh.add_argument("--redis-url", help="default: MOENGAGE_REDIS_URL")
    refresh.add_argument("--workspace-id", help="default: MOENGAGE_WORKSPACE_ID")
    refresh.add_argument("--namespace", default="pm", help="the layer's namespace (default pm)")
    refresh.add_argument(
        "--keys",
        nargs="+",
        metavar="KEY",
        default=[],
        help="also forget these keys' cached content everywhere (the campaign's content changed)",
    )
    refresh.set_defaults(handler=_refresh)
    return parser


def _refresh(args: argparse.Namespace) -> int:
    url = args.redis_url or os.environ.get("MOENGAGE_REDIS_URL", "").strip()
    workspace = args.workspace_id or os.environ.get("MOENGAGE_WORKSPACE_ID", "").strip()
    if not url or not workspace:
        raise CommandError("refresh needs --redis-url and --workspace-id (or MOENGAGE_*)")
    from .cache.redis import RedisSharedLayer

    layer = RedisSharedLayer(url, workspace_id=workspace, namespace=args.namespace, op_timeout=2.0)

    async def run() -> int:
        try:
            return await layer.publish_refresh(args.keys or None, strict=True)
        finally:
            await layer.aclose()

    listening = asyncio.run(run())
    print(f"refresh sent to workspace {workspace}: {listening} process(es) listening")
    return 0


def _add_file(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--file",
        help="a local experiences file (.json/.yaml); default: MoEngage when MOENGAGE_* is "
        "set, else the packaged sample",
    )


# -- sources ------------------------------------------------------------------------------


def _local_backend(path: str | None) -> LocalBackend:
    from .local import LocalBackend

    return LocalBackend(path) if path is not None else LocalBackend.default()


def _backend(args: argparse.Namespace) -> tuple[PersonalizeBackend, str]:
    """The backend a read command talks to, and a line saying which it is."""
    if args.file is None and PersonalizeSettings.env_has_credentials():
        from .upstream import PersonalizeClient  # lazily: only this path needs httpx set up

        settings = PersonalizeSettings.from_env()
        return PersonalizeClient(settings), f"MoEngage API {settings.api_base_url}"
    backend = _local_backend(args.file)
    return backend, f"local file {backend.experiences.source}"


async def _metadata(backend: PersonalizeBackend, statuses: list[str] | None) -> list[Any]:
    async with backend:
        return await backend.fetch_metadata(statuses)


# -- experiences --------------------------------------------------------------------------


def _experiences(args: argparse.Namespace) -> int:
    statuses = _split_statuses(args.status)
    backend, source = _backend(args)
    items: list[ExperienceMetadata] = asyncio.run(_metadata(backend, statuses))
    out = sys.stdout
    print(f"# {len(items)} experience(s) from {source}", file=out)
    if items:
        width = max(len(item.key) for item in items)
        for item in sorted(items, key=lambda m: (m.status != "Active", m.key)):
            print(f"{item.key:<{width}}  {item.status:<9}  {item.name}", file=out)
    return 0


def _split_statuses(raw: Sequence[str] | None) -> list[str] | None:
    if not raw:
        return None
    statuses = [part.strip() for item in raw for part in item.split(",") if part.strip()]
    for status in statuses:
        if status not in EXPERIENCE_STATUSES:
            raise CommandError(
                f"unknown status {status!r}: use {', '.join(EXPERIENCE_STATUSES)} (case-sensitive)"
            )
    return statuses


# -- fetch --------------------------------------------------------------------------------


def _fetch(args: argparse.Namespace) -> int:
    if not args.customer_id and not args.email:
        raise CommandError("fetch needs --customer-id or --email")
    attributes = _attributes(args.attr)
    now = datetime.now(UTC)
    attributes.setdefault("DAY_OF_THE_WEEK", now.strftime("%A"))
    attributes.setdefault("TIME_OF_THE_DAY", now.strftime("%H"))
    backend, source = _backend(args)

    async def run() -> tuple[dict[str, Any], dict[str, str]]:
        async with backend:
            experiences = await backend.fetch_experiences(
                args.keys,
                customer_id=args.customer_id or None,
                user_identifiers={"u_em": args.email} if args.email else None,
                attributes=attributes,
            )
            statuses: dict[str, str] = {}
            if any(key not in experiences for key in args.keys):
                # An absent key is "no match" OR "no such key": the metadata tells which.
                metadata = await backend.fetch_metadata(list(EXPERIENCE_STATUSES))
                statuses = {item.key: item.status for item in metadata}
            return experiences, statuses

    experiences, statuses = asyncio.run(run())
    unknown = [k for k in dict.fromkeys(args.keys) if k not in experiences and k not in statuses]
    if args.json:
        wire = {key: experience.to_api() for key, experience in experiences.items()}
        print(json.dumps({"experiences": wire}, indent=2, ensure_ascii=False))
    else:
        _print_fetch(sys.stdout, args, source, attributes, experiences, statuses)
    for key in unknown:
        _fail(f"unknown experience key {key!r} in {source}; {_did_you_mean(key, statuses)}")
    return 1 if unknown else 0


def _did_you_mean(key: str, statuses: Mapping[str, str]) -> str:
    from .upstream import suggest_key

    known = sorted(statuses)
    hint = suggest_key(key, known)
    if hint is not None:
        return f"did you mean {hint!r}?"
    if not known:
        return "it has no experiences"
    return "known keys: " + ", ".join(known[:10]) + (", ..." if len(known) > 10 else "")


def _print_fetch(
    out: TextIO,
    args: argparse.Namespace,
    source: str,
    attributes: Mapping[str, Any],
    experiences: Mapping[str, Any],
    statuses: Mapping[str, str],
) -> None:
    who = args.customer_id or f"email {args.email}"
    session = ", ".join(f"{k}={v}" for k, v in attributes.items())
    print(f"# {who} from {source} ({session})", file=out)
    for key in dict.fromkeys(args.keys):
        experience = experiences.get(key)
        if experience is None:
            status = statuses.get(key)
            if status is None:
                print(f"{key}: unknown key; {_did_you_mean(key, statuses)}", file=out)
            elif status != "Active":
                print(f"{key}: {status}: every user gets the default until it is Active", file=out)
            else:
                print(f"{key}: no experience for this user (the default renders)", file=out)
            continue
        context = experience.experience_context
        print(
            f"{key}: variation {context.get('moe_variation_id')} of "
            f"{context.get('experience', key)!r}, audience {context.get('audience_name')!r} "
            f"({context.get('audience_id')})",
            file=out,
        )
        names = list(experience.raw_payload)
        width = max((len(name) for name in names), default=0)
        for name in names:
            data_type = experience.raw_payload[name].get("data_type", "string")
            if name in experience.payload:
                shown = json.dumps(experience.payload[name], ensure_ascii=False)
            else:
                shown = "(did not convert: the template default applies)"
            print(f"    {name:<{width}} = {shown}  [{data_type}]", file=out)


def _attributes(pairs: Iterable[str]) -> dict[str, Any]:
    attributes: dict[str, Any] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise CommandError(f"--attr expects NAME=VALUE, got {pair!r}")
        attributes[name.strip()] = value
    return attributes


# -- check --------------------------------------------------------------------------------


def _check(args: argparse.Namespace) -> int:
    if not (args.app or args.keys_file or args.keys or args.templates):
        # What argparse says for a required group, now that --templates may stand alone.
        sys.stderr.write(args.usage())
        _fail("one of the arguments --app --keys-file --keys --templates is required")
        return 2
    failed = False
    if args.app or args.keys_file or args.keys:
        failed = _check_keys(args)
    if args.templates:
        failed = _check_templates(args.templates) or failed
    return 1 if failed else 0


def _check_templates(paths: list[str]) -> bool:
    """Print the template warnings; True when there were any."""
    from .jinja import lint_templates

    findings, files = lint_templates(paths)
    out = sys.stdout
    for finding in findings:
        print(finding, file=out)
    if findings:
        print(f"FAILED: {len(findings)} template warning(s) in {files} file(s)", file=out)
    else:
        print(f"OK: no template warnings in {files} file(s)", file=out)
    return bool(findings)


def _check_keys(args: argparse.Namespace) -> bool:
    """Print the key check; True when it failed."""
    app_backend: PersonalizeBackend | None = None
    if args.app:
        keys, app_backend = _keys_from_app(args.app)
    elif args.keys_file:
        keys = _keys_from_file(args.keys_file)
    else:
        keys = list(dict.fromkeys(args.keys))
    if app_backend is not None and args.file is None:
        # The app runs in local mode: check against ITS experiences file.
        backend, source = app_backend, "the app's local experiences"
    else:
        backend, source = _backend(args)
    metadata = {m.key: m for m in asyncio.run(_metadata(backend, None))}
    out = sys.stdout
    print(f"# {len(keys)} configured key(s) against {len(metadata)} from {source}", file=out)
    unknown = inactive = 0
    for key in keys:
        found = metadata.get(key)
        if found is None:
            unknown += 1
            close = difflib.get_close_matches(key, list(metadata), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            print(f"unknown   {key}: no such experience in the workspace{hint}", file=out)
        elif not found.is_active:
            inactive += 1
            print(
                f"{found.status.lower():<9} {key}: users get the default until it is Active",
                file=out,
            )
        else:
            print(f"ok        {key}", file=out)
    failed = unknown > 0 or (args.strict and inactive > 0)
    print(f"{'FAILED' if failed else 'OK'}: {unknown} unknown, {inactive} not active", file=out)
    return bool(failed)


def _keys_from_file(path: str) -> list[str]:
    text = Path(path).read_text(encoding="utf-8")
    if path.lower().endswith(".json"):
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise CommandError(f"{path}: not valid JSON: {exc}") from None
        return _keys_from_object(data, path)
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return list(dict.fromkeys(line for line in lines if line))


def _keys_from_app(spec: str) -> tuple[list[str], PersonalizeBackend | None]:
    """The app's configured keys, and its backend when it runs in local mode."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise CommandError(f"--app expects MODULE:ATTR (e.g. example_app.main:app), got {spec!r}")
    # Like uvicorn: the app's module is found from the current directory.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise CommandError(f"cannot import {module_name!r}: {exc}") from None
    except Exception as exc:
        raise CommandError(
            f"importing {module_name!r} failed: {type(exc).__name__}: {exc}"
        ) from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise CommandError(f"{module_name!r} has no attribute {attr!r}") from None
    middleware = _find_configured(obj)
    local_backend = (
        middleware.backend
        if middleware is not None and getattr(middleware, "local_mode", False)
        else None
    )
    return _keys_from_object(obj, spec), local_backend


def _find_configured(obj: Any) -> Any:
    """The object holding ``configured_keys``: ``obj`` or a middleware in its stack."""
    if _configured_keys(obj) is not None:
        return obj
    if hasattr(obj, "user_middleware") and hasattr(obj, "build_middleware_stack"):
        stack = getattr(obj, "middleware_stack", None) or obj.build_middleware_stack()
        for _ in range(_MAX_APP_DEPTH):
            if _configured_keys(stack) is not None:
                return stack
            if not hasattr(stack, "app"):
                break
            stack = stack.app
    return None


def _keys_from_object(obj: Any, where: str) -> list[str]:
    """Keys from a list/tuple/set of keys, a dict of route -> key(s), an object with
    ``configured_keys`` (attribute or method), or a Starlette app whose middleware has it."""
    holder = _find_configured(obj)
    found = _configured_keys(holder) if holder is not None else obj
    keys: list[str] = []
    if isinstance(found, str):
        keys.append(found)
    elif isinstance(found, Mapping):
        for value in found.values():
            keys.extend([value] if isinstance(value, str) else _strings(value, where))
    elif isinstance(found, list | tuple | set | frozenset):
        keys.extend(_strings(found, where))
    else:
        raise CommandError(
            f"{where}: cannot find experience keys in a {type(obj).__name__}: expected a list "
            "or dict of keys, an object with configured_keys, or an app using "
            "PersonalizeMiddleware"
        )
    return list(dict.fromkeys(keys))


def _configured_keys(obj: Any) -> Any:
    if not hasattr(obj, "configured_keys") or isinstance(obj, type):
        return None
    value = obj.configured_keys
    return value() if callable(value) else value


def _strings(values: Any, where: str) -> list[str]:
    if not isinstance(values, Iterable) or isinstance(values, str | bytes | Mapping):
        raise CommandError(f"{where}: expected experience keys, got {type(values).__name__}")
    result = []
    for value in values:
        if not isinstance(value, str) or not value:
            raise CommandError(f"{where}: experience keys must be non-empty strings, got {value!r}")
        result.append(value)
    return result


# -- serve-local --------------------------------------------------------------------------


def _serve_local(args: argparse.Namespace) -> int:
    if not 0 <= args.port <= 65535:
        raise CommandError(f"--port must be 0..65535, got {args.port}")
    try:
        import uvicorn
    except ImportError:
        raise CommandError(
            "serve-local needs uvicorn: pip install personalize-middleware[example]"
        ) from None
    from .local import LocalBackend, create_local_server

    backend = (
        LocalBackend(args.file, events_log=args.events_log)
        if args.file is not None
        else LocalBackend.default(events_log=args.events_log)
    )
    app = create_local_server(backend, workspace_id=args.workspace_id, api_secret=args.api_secret)
    # Bind first, so the printed URL carries the real port (also with --port 0).
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as exc:
        sock.close()
        raise CommandError(f"cannot listen on {args.host}:{args.port}: {exc.strerror}") from None
    port = sock.getsockname()[1]
    host = f"[{args.host}]" if family == socket.AF_INET6 else args.host
    base = f"http://{host}:{port}"
    secret_hint = (
        f"MOENGAGE_API_SECRET={DEFAULT_API_SECRET}"
        if args.api_secret == DEFAULT_API_SECRET
        else "MOENGAGE_API_SECRET=<your --api-secret>"
    )
    print(
        f"MoEngage-compatible local server: {base}/v1\n"
        f"  experiences: {backend.experiences.source} ({len(backend.experiences.experiences)})\n"
        f"  report:      {base}/report/ (user {args.workspace_id}, password: the API secret)\n"
        f"  clients:     MOENGAGE_BASE_URL={base}/v1 MOENGAGE_WORKSPACE_ID={args.workspace_id} "
        f"{secret_hint}",
        flush=True,
    )
    config = uvicorn.Config(app, log_level="info", lifespan="off")
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
    return 0
