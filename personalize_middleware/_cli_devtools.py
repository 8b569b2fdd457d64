"""The developer-tools commands of ``personalize-middleware``::

    preview     a signed link: this browser sees the site as a customer or an audience
    qa-cookie   a signed link (and Cookie header): the debug overlay and Server-Timing

Both sign with the app's ``secret_key``: ``PERSONALIZE_SECRET_KEY``, or
``--secret-key-file``; without either, the key the middleware derives from
``MOENGAGE_API_SECRET`` when it has no ``secret_key`` of its own. The link goes to stdout
(scriptable), what it grants to stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from ._exceptions import ConfigurationError
from ._grants import (
    DEFAULT_PREVIEW_TTL,
    DEFAULT_QA_TTL,
    QA_COOKIE,
    parse_duration,
    preview_link,
    qa_link,
)
from ._signing import Keyring

__all__ = ["SECRET_KEY_ENV", "add_commands"]

SECRET_KEY_ENV = "PERSONALIZE_SECRET_KEY"  # noqa: S105 - the variable's name


def add_commands(commands: Any) -> None:
    """Add ``preview`` and ``qa-cookie`` to the CLI's subcommands."""
    preview = commands.add_parser(
        "preview",
        help="mint a signed preview link: see the site as a customer or an audience would",
    )
    preview.add_argument("--as-customer", metavar="ID", help="the customer_id to preview as")
    preview.add_argument(
        "--attr",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an in-session attribute of the audience, e.g. utm_medium=email; "
        "device=mobile|tablet|desktop stands for a user agent of that kind",
    )
    preview.add_argument(
        "--ttl", default="1h", help="how long the preview lasts: 30m, 1h, ... (at most 24h)"
    )
    _common(preview)
    preview.set_defaults(handler=_preview)

    qa = commands.add_parser(
        "qa-cookie",
        help="mint a signed QA link and cookie: the debug overlay and Server-Timing",
    )
    qa.add_argument("--ttl", default="8h", help="how long it lasts: 8h, 2d, ... (at most 7d)")
    qa.add_argument("--label", help="whose cookie it is (shown in the overlay)")
    _common(qa)
    qa.set_defaults(handler=_qa_cookie)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--secret-key-file",
        metavar="PATH",
        help=f"a file holding the app's secret_key (default: ${SECRET_KEY_ENV}, else the key "
        "derived from $MOENGAGE_API_SECRET)",
    )
    parser.add_argument(
        "--prefix",
        default="/_personalize",
        help="the middleware's tracking_prefix, with the mount path if any (default /_personalize)",
    )
    parser.add_argument("url", metavar="URL", help="the page to open, e.g. https://shop/landing")


def _preview(args: argparse.Namespace) -> int:
    attributes = _attributes(args.attr)
    if not args.as_customer and not attributes:
        raise ConfigurationError("preview needs --as-customer, --attr or both")
    link = preview_link(
        args.url,
        secret_key=_keyring(args),
        customer_id=args.as_customer,
        attributes=attributes,
        ttl=args.ttl,
        prefix=args.prefix,
    )
    who = ", ".join(
        ([f"customer {args.as_customer}"] if args.as_customer else [])
        + [f"{k}={v}" for k, v in attributes.items()]
    )
    print(link)
    print(
        f"# preview as {who} until {_until(args.ttl, DEFAULT_PREVIEW_TTL)}; "
        "the app needs PersonalizeMiddleware(preview=True)",
        file=sys.stderr,
    )
    return 0


def _qa_cookie(args: argparse.Namespace) -> int:
    link = qa_link(
        args.url, secret_key=_keyring(args), ttl=args.ttl, label=args.label, prefix=args.prefix
    )
    token = parse_qs(urlsplit(link).query)["token"][0]
    print(link)
    print(f"# or send the cookie yourself: Cookie: {QA_COOKIE}={token}", file=sys.stderr)
    print(
        f"# debug overlay and Server-Timing until {_until(args.ttl, DEFAULT_QA_TTL)}",
        file=sys.stderr,
    )
    return 0


def _keyring(args: argparse.Namespace) -> Keyring:
    if args.secret_key_file:
        secret = Path(args.secret_key_file).read_text(encoding="utf-8").strip()
        if not secret:
            raise ConfigurationError(f"{args.secret_key_file} is empty")
        return Keyring([secret])
    secret = os.environ.get(SECRET_KEY_ENV, "").strip()
    if secret:
        return Keyring([secret])
    api_secret = os.environ.get("MOENGAGE_API_SECRET", "").strip()
    if api_secret:
        return Keyring.from_config(None, api_secret=api_secret)
    raise ConfigurationError(
        f"no signing key: set {SECRET_KEY_ENV} to the app's secret_key (or pass "
        "--secret-key-file), or MOENGAGE_API_SECRET if the app has no secret_key"
    )


def _attributes(pairs: list[str]) -> dict[str, str]:
    attributes: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise ConfigurationError(f"--attr expects NAME=VALUE, got {pair!r}")
        attributes[name.strip()] = value.strip()
    return attributes


def _until(ttl: str, default: float) -> str:
    try:
        seconds = parse_duration(ttl)
    except ConfigurationError:
        seconds = default
    when = datetime.now(UTC).timestamp() + seconds
    return datetime.fromtimestamp(when, UTC).strftime("%Y-%m-%d %H:%M UTC")
