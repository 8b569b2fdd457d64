"""The README's fenced code blocks, so tests (and CI) run what a user copies.

A block that is meant to be saved as a file names it on its first line: ``# app.py`` in
Python, ``{# templates/home.html #}`` in Jinja; a block continuing a file says
``# app.py (continued)``. Blocks are looked up by the ``##`` section they are in.

``python -m tests.support.readme install-target`` prints the package spec of the README's
install line for this checkout (``.[fastapi]``): CI installs exactly that into a fresh
virtual environment and runs the quick starts with it.
"""

from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = ["README", "Block", "blocks", "install_command", "section_blocks"]

README = Path(__file__).resolve().parents[2] / "README.md"
PACKAGE = "personalize-middleware"
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
_FILE_MARK = re.compile(r"^(?:#|\{#)\s*([\w./-]+\.\w+)(?:\s+\(continued\))?\s*(?:#\})?\s*$")


@dataclass(frozen=True)
class Block:
    section: str
    language: str
    text: str

    @property
    def file(self) -> str | None:
        """The file the block says it is (``app.py``), if it says so."""
        first = self.text.split("\n", 1)[0]
        match = _FILE_MARK.match(first)
        return match.group(1) if match else None

    @property
    def continues(self) -> bool:
        return "(continued)" in self.text.split("\n", 1)[0]


def blocks(path: Path = README) -> list[Block]:
    text = path.read_text(encoding="utf-8")
    found: list[Block] = []
    for match in _FENCE.finditer(text):
        headings = re.findall(r"^## (.+)$", text[: match.start()], re.M)
        found.append(Block(headings[-1] if headings else "", match.group(1), match.group(2)))
    return found


def section_blocks(section: str, path: Path = README) -> list[Block]:
    chosen = [block for block in blocks(path) if block.section == section]
    assert chosen, f"README has no code block under '## {section}'"
    return chosen


def install_command(path: Path = README) -> list[str]:
    """The one ``pip install`` line of the README's Install section, as argv."""
    lines = [
        line
        for block in section_blocks("Install", path)
        for line in block.text.splitlines()
        if line.startswith("pip install ")
    ]
    assert len(lines) == 1, f"expected one pip install line, found {lines}"
    return shlex.split(lines[0], comments=True)


def _install_target() -> str:
    """The README's requirement with the package name replaced by this checkout."""
    (requirement,) = [arg for arg in install_command()[2:] if not arg.startswith("-")]
    assert requirement.startswith(PACKAGE), requirement
    return "." + requirement.removeprefix(PACKAGE)


if __name__ == "__main__":  # pragma: no cover - used by .ci/run
    if sys.argv[1:] != ["install-target"]:
        sys.exit("usage: python -m tests.support.readme install-target")
    print(_install_target())
