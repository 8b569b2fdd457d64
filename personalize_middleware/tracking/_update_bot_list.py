"""Rewrite the vendored crawler list from an upstream release::

    python -m personalize_middleware.tracking._update_bot_list \
        crawler-user-agents.json VERSION [YYYY-MM-DD]

``crawler-user-agents.json`` is the file of that name in the crawler-user-agents
project (its PyPI wheel has it as ``crawleruseragents/crawler-user-agents.json``). Every
pattern is compiled to literal tokens first: one using syntax the compiler does not
know stops the update (``BotPatternError``) and the file is left as it was.
"""

from __future__ import annotations

import datetime
import json
import pathlib
import sys

from ._bots import BOT_LIST_FILE, BotPatternError, literal_alternatives

__all__ = ["main", "render_list"]

_UPSTREAM = "https://github.com/monperrus/crawler-user-agents"
_LICENCE = """\
The MIT License (MIT)

Copyright (c) 2017 Martin Monperrus

Permission is hereby granted, free of charge, to any person obtaining a copy of
this software and associated documentation files (the "Software"), to deal in
the Software without restriction, including without limitation the rights to
use, copy, modify, merge, publish, distribute, sublicense, and/or sell copies of
the Software, and to permit persons to whom the Software is furnished to do so,
subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS
FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR
COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER
IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM, OUT OF OR IN
CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE."""


def render_list(patterns: list[str], *, version: str, taken: str) -> str:
    """The text of the vendored list file for upstream's ``patterns`` (in their order)
    of release ``version``, taken on ``taken`` (YYYY-MM-DD). Every pattern is compiled
    first: one the literal compiler does not know raises ``BotPatternError`` here."""
    for pattern in patterns:
        if not pattern or pattern.startswith("#") or "\n" in pattern:
            raise BotPatternError(f"bot list entry {pattern!r} cannot be a line of the file")
        literal_alternatives(pattern)
    header = [
        "Known crawler user agents: one regular expression a line, matched case-insensitively.",
        "",
        f"Source: the crawler-user-agents project, {_UPSTREAM}",
        f"Snapshot: PyPI package crawler-user-agents {version}, file",
        f'  crawleruseragents/crawler-user-agents.json (its {len(patterns)} "pattern" fields, '
        "in order).",
        f'Taken: {taken}. How to update: docs/tracking.md, "The bot list".',
        "personalize_middleware/tracking/_bots.py turns each pattern into literal tokens "
        "(matched in",
        "linear time); a pattern using regex syntax it does not know fails the import and "
        "the tests.",
        "Lines starting with '#' are comments; a pattern may start or end with a space.",
        "",
        "The list is under the MIT licence:",
        "",
        *_LICENCE.split("\n"),
        "",
    ]
    lines = [("# " + line) if line else "#" for line in header]
    return "\n".join([*lines, *patterns]) + "\n"


def main(argv: list[str], target: pathlib.Path | None = None) -> int:
    """Rewrite ``target`` (the vendored list) from ``argv``: JSON path, version, date."""
    if len(argv) not in (2, 3):
        print(__doc__, file=sys.stderr)
        return 2
    entries = json.loads(pathlib.Path(argv[0]).read_text(encoding="utf-8"))
    patterns = [entry["pattern"] for entry in entries]
    taken = argv[2] if len(argv) == 3 else datetime.date.today().isoformat()
    text = render_list(patterns, version=argv[1], taken=taken)
    target = target or pathlib.Path(__file__).with_name(BOT_LIST_FILE)
    target.write_text(text, encoding="utf-8")
    print(f"{target}: {len(patterns)} patterns of crawler-user-agents {argv[1]}, {taken}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
