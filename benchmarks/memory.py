"""Memory per cached user: the store filled with N users x 3 experiences, in a fresh
subprocess (``python -m benchmarks.memory N rss|tracemalloc``) so nothing else of the run
is counted. Users go through the store's real path (lookup, fetch task, L1 insert), each
with its own visitor id and in-session attributes, each answer parsed from its own JSON;
mode ``rss`` / ``tracemalloc``: every answer unique, ``variation``: the same variation.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import secrets
import subprocess
import sys
import tracemalloc
from collections.abc import Iterable
from typing import Any

from personalize_middleware import ExperienceStore
from personalize_middleware._context import SessionAttributes
from personalize_middleware._models import Experience, FetchQuery, Identity

from ._apps import KEYS, USER_AGENT, InstantBackend, experience_body
from ._report import Row

__all__ = ["run"]


def _rss_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _VariationBackend(InstantBackend):
    """Answers every user with the same variation, parsed from its own JSON on every call
    (as the real client does): the store's interning is what makes users share it."""

    async def fetch_experiences(self, keys: Iterable[str], **kwargs: Any) -> dict[str, Experience]:
        kwargs["customer_id"] = "everyone in the variation"
        return await super().fetch_experiences(keys, **kwargs)


async def _fill(users: int, mode: str) -> dict[str, float]:
    backend = _VariationBackend() if mode == "variation" else InstantBackend()
    store = ExperienceStore(backend, maxsize=users)
    attributes = SessionAttributes()
    agent = USER_AGENT.encode()
    gc.collect()
    if mode == "tracemalloc":
        tracemalloc.start()
    before = _rss_bytes()
    for i in range(users):
        scope = {
            "type": "http",
            "headers": [(b"user-agent", agent)],  # decoded per request, as in a server
            "client": (f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", 40000),
            "query_string": b"",
        }
        query = FetchQuery(Identity(visitor_id=secrets.token_urlsafe(16)), attributes.build(scope))
        found = await store.get(query, KEYS)
        assert len(found) == len(KEYS)
    await asyncio.sleep(0)
    gc.collect()
    assert len(store) == users, len(store)
    result: dict[str, float] = {"users": users}
    if mode == "tracemalloc":
        result["bytes"] = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
    else:
        result["bytes"] = _rss_bytes() - before
    return result


def _measure(users: int, mode: str) -> float:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.memory", str(users), mode],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return float(json.loads(out)["bytes"]) / users


async def run(*, quick: bool) -> list[Row]:
    users = 5_000 if quick else 100_000
    # tracemalloc counts exactly but slows the fill ~3x: a fifth of the users is enough.
    traced_users = users // 5
    answer = len(experience_body(KEYS, "user-00000"))
    rss = _measure(users, "rss")
    traced = _measure(traced_users, "tracemalloc")
    shared = _measure(users, "variation")
    return [
        Row(
            section="memory",
            name=f"per cached user, {users:,} users x 3 experiences, each answer unique",
            baseline=f"{answer:,} B (the API's JSON answer)",
            measured=f"{rss / 1024:,.1f} KiB RSS ({traced / 1024:,.1f} KiB traced)",
            ratio=rss / answer,
            note=(
                f"RSS growth ({users:,} users) and tracemalloc ({traced_users:,} users), each "
                f"in a fresh subprocess; {users * rss / 2**20:,.0f} MiB for {users:,} users"
            ),
            data={"rss_per_user": rss, "traced_per_user": traced, "answer_bytes": answer},
        ),
        Row(
            section="memory",
            name="per cached user, answers identical per variation (interned)",
            baseline=f"{answer:,} B (the API's JSON answer)",
            measured=f"{shared / 1024:,.1f} KiB RSS",
            ratio=shared / answer,
            note=(
                "the same fill, every user answered the same variation, each answer parsed "
                "from its own JSON: the store interns identical answers (the usual case; "
                "the row above is the worst case, a payload personalized per user)"
            ),
            data={"rss_per_user": shared},
        ),
    ]


if __name__ == "__main__":
    print(json.dumps(asyncio.run(_fill(int(sys.argv[1]), sys.argv[2]))))
