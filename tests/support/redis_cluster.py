"""A Redis Cluster of the test's own: three masters from ``redis-server`` processes on free
ports, joined with ``redis-cli --cluster create`` (no replicas), in a temporary directory.

::

    with private_cluster() as cluster:     # skips (fails in CI) without the binaries
        url = cluster.url                   # "redis+cluster://127.0.0.1:<port>"
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import redis

from tests.conftest import require_tool

__all__ = ["PrivateCluster", "private_cluster"]


def _free_ports(n: int) -> list[int]:
    """``n`` ports free now, each with its cluster bus port (+10000) free too."""
    ports: list[int] = []
    while len(ports) < n:
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
        if port + 10000 > 65535 or port in ports:
            continue
        with socket.socket() as b:
            try:
                b.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        ports.append(port)
    return ports


class PrivateCluster:
    def __init__(self, server: str, cli: str, directory: Path, masters: int = 3) -> None:
        self.server = server
        self.cli = cli
        self.directory = directory
        self.ports = _free_ports(masters)
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.ports[0]}"

    def ask(self, port: int, *command: str) -> object:
        """One command to one node (a client opened and closed for it)."""
        client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)
        try:
            return client.execute_command(*command)
        finally:
            client.close()

    def start(self) -> None:
        for port in self.ports:
            self.procs.append(
                subprocess.Popen(
                    [
                        self.server,
                        "--port",
                        str(port),
                        "--bind",
                        "127.0.0.1",
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        f"nodes-{port}.conf",
                        "--cluster-node-timeout",
                        "5000",
                        "--save",
                        "",
                        "--appendonly",
                        "no",
                        "--dir",
                        str(self.directory),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        for port in self.ports:
            self._wait(lambda port=port: bool(self.ask(port, "PING")), f"node {port}")
        subprocess.run(
            [
                self.cli,
                "--cluster",
                "create",
                *(f"127.0.0.1:{port}" for port in self.ports),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        for port in self.ports:
            self._wait(
                lambda port=port: "cluster_state:ok" in str(self.ask(port, "CLUSTER", "INFO")),
                f"cluster state ok on {port}",
            )

    def _wait(self, condition: object, what: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with suppress(redis.RedisError, OSError):
                if condition():  # type: ignore[operator]
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"Redis Cluster: timed out waiting for {what}")
            time.sleep(0.05)  # polling the real condition

    def keys(self, pattern: str) -> list[bytes]:
        """Every key matching ``pattern``, on every node."""
        found: list[bytes] = []
        for port in self.ports:
            client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)
            try:
                found += list(client.scan_iter(match=pattern, count=500))
            finally:
                client.close()
        return found

    def stop(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait(10)
        self.procs.clear()


@contextmanager
def private_cluster() -> Iterator[PrivateCluster]:
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    require_tool(server is not None and cli is not None, "redis-server and redis-cli")
    assert server is not None and cli is not None
    with tempfile.TemporaryDirectory(prefix="pm-cluster-") as directory:
        cluster = PrivateCluster(server, cli, Path(directory))
        try:
            cluster.start()
            yield cluster
        finally:
            cluster.stop()
