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

from ._bots import BOT_LIST_FILE, render_list

__all__ = ["main"]


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
