"""``python -m benchmarks._serve PRESET PORT HTTP``: one benchmark page (a name from
``_apps.PRESETS``) under uvicorn, one worker, ``--loop uvloop`` (asyncio's own loop where
uvloop is missing), ``--http HTTP`` (``httptools`` or ``h11``), lifespan on, no access
log: the HTTP runs need it in its own process."""

from __future__ import annotations

import importlib.util
import sys

__all__ = ["loop", "main"]


def loop() -> str:
    """uvloop where installed (the bench extra), else asyncio's own loop."""
    return "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"


def main() -> None:
    import uvicorn

    from ._apps import preset_app

    preset, port, http = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    uvicorn.run(
        preset_app(preset),
        host="127.0.0.1",
        port=port,
        loop=loop(),
        http=http,
        log_level="warning",
        access_log=False,
        lifespan="on",
    )


if __name__ == "__main__":
    main()
