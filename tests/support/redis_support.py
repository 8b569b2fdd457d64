"""Redis for the tests: the shared server, throwaway namespaces, and a private server a
test may kill and restart.

``REDIS_URL`` is ``redis://127.0.0.1:6379`` unless ``PERSONALIZE_TEST_REDIS_URL`` says
otherwise. Each test works in its own random workspace id, so tests never see each
other's keys, and ``delete_workspace`` removes what a test left behind.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

import redis

__all__ = [
    "REDIS_URL",
    "PrivateRedis",
    "delete_workspace",
    "new_workspace",
    "redis_available",
    "redis_server_binary",
]

REDIS_URL = os.environ.get("PERSONALIZE_TEST_REDIS_URL", "redis://127.0.0.1:6379")


def redis_available(url: str = REDIS_URL) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError):
        return False


def redis_server_binary() -> str | None:
    return shutil.which("redis-server")


def new_workspace() -> str:
    return "t" + secrets.token_hex(6)


def delete_workspace(workspace: str, url: str = REDIS_URL, namespace: str = "pm") -> int:
    """Delete every key of ``workspace``; returns how many there were."""
    client = redis.Redis.from_url(url, socket_timeout=2)
    try:
        keys = list(client.scan_iter(match=f"{namespace}:*{{{workspace}}}*", count=500))
        if keys:
            client.delete(*keys)
        return len(keys)
    finally:
        client.close()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrivateRedis:
    """A ``redis-server`` of the test's own on a free port, without persistence, that the
    test may ``stop()`` (SIGKILL: a crash, not a clean shutdown) and ``start()`` again on
    the same port."""

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> None:
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self._proc = subprocess.Popen(
            [self.binary, *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while not redis_available(self.url):
            if self._proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self._proc.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not answer on port {self.port}")
            time.sleep(0.02)  # polling the real condition: the server answers PING

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(10)
            self._proc = None

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=2)


@contextmanager
def private_redis(binary: str) -> Iterator[PrivateRedis]:
    server = PrivateRedis(binary)
    server.start()
    try:
        yield server
    finally:
        server.stop()
