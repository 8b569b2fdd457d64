"""``python -m benchmarks._serve VARIANT PORT``: one benchmark app under uvicorn (one worker,
lifespan on, no access log), as the HTTP runs need it in its own process."""

from __future__ import annotations

import sys

__all__ = ["main"]


def main() -> None:
    import uvicorn

    variant, port = sys.argv[1], int(sys.argv[2])
    uvicorn.run(
        f"benchmarks._apps:{variant}_app",
        factory=True,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
        lifespan="on",
    )


if __name__ == "__main__":
    main()
