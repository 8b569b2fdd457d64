"""Run a real server process (uvicorn, gunicorn, the CLI) and watch what it says.

::

    with ServerProcess([python, "-m", "uvicorn", "app:app", "--port", "0"], cwd=tmp) as server:
        base = server.wait_until_serving()          # "http://127.0.0.1:<port>"
        ...
    status, output = run_until_exit([...], cwd=tmp, timeout=20)   # a server that must fail

The output (stdout and stderr, merged) is read by a thread into a list, so waiting means
waiting on a condition ("a line says where it listens", "the process exited"), never
sleeping. Processes are stopped with SIGTERM, then SIGKILL, and always reaped.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

__all__ = [
    "REPO_ROOT",
    "ServerProcess",
    "clean_env",
    "run_until_exit",
]

REPO_ROOT = Path(__file__).resolve().parents[2]
_LISTENING = re.compile(r"(?:Uvicorn running on|Listening at:|local server:) (http://[\w.\[\]:]+)")


def clean_env(
    extra: Mapping[str, str] | None = None, *, home: Path | None = None
) -> dict[str, str]:
    """The environment of a fresh shell: no ``MOENGAGE_*`` (local mode), the repository
    importable (the package, ``example_app``), gunicorn's control socket under ``home``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOENGAGE_")}
    env.pop("PYTHONWARNINGS", None)
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + path if path else "")
    env["PYTHONUNBUFFERED"] = "1"
    if home is not None:
        env["XDG_RUNTIME_DIR"] = str(home)  # gunicorn >= 24 puts a control socket there
    env.update(extra or {})
    return env


class ServerProcess:
    """A child process whose merged output is collected line by line."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        cwd: Path,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.argv = list(argv)
        self._cwd = cwd
        self._env = dict(env) if env is not None else clean_env()
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._process: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    def __enter__(self) -> Self:
        self._process = subprocess.Popen(
            self.argv,
            cwd=self._cwd,
            env=self._env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # gunicorn's workers are stopped with their master
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def output(self) -> str:
        with self._changed:
            return "".join(self.lines)

    @property
    def returncode(self) -> int | None:
        assert self._process is not None
        return self._process.poll()

    def _read(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        with self._process.stdout:
            for line in self._process.stdout:
                with self._changed:
                    self.lines.append(line)
                    self._changed.notify_all()
        self._process.wait()
        with self._changed:
            self._changed.notify_all()

    def wait_for(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        """The first match of ``pattern`` in the output; fails if the process exits or
        ``timeout`` passes first."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = regex.search("".join(self.lines))
                if found:
                    return found
                remaining = deadline - time.monotonic()
                exited = self._process is not None and self._process.poll() is not None
                if exited and not (self._reader and self._reader.is_alive()):
                    raise AssertionError(
                        f"{self.argv[:4]} exited before printing {pattern!r}:\n"
                        + "".join(self.lines)
                    )
                if remaining <= 0:
                    raise AssertionError(
                        f"{pattern!r} not printed within {timeout} s:\n{''.join(self.lines)}"
                    )
                self._changed.wait(min(remaining, 0.5))

    def wait_until_serving(self, timeout: float = 30.0) -> str:
        """The base URL once the server says it listens and has started the app."""
        base = self.wait_for(_LISTENING.pattern, timeout).group(1)
        return base.replace("0.0.0.0", "127.0.0.1")

    def wait_exit(self, timeout: float) -> int:
        assert self._process is not None
        try:
            status = self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.argv[:4]} still running after {timeout} s:\n{self.output}"
            ) from None
        if self._reader is not None:
            self._reader.join(5)
        return status

    def stop(self) -> None:
        process = self._process
        if process is None or process.poll() is not None:
            if self._reader is not None:
                self._reader.join(5)
            return
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
        except ProcessLookupError:
            pass
        if self._reader is not None:
            self._reader.join(5)


def run_until_exit(
    argv: Sequence[str], *, cwd: Path, env: Mapping[str, str] | None = None, timeout: float
) -> tuple[int, str]:
    """Run a process that is expected to stop by itself: (exit status, merged output)."""
    with ServerProcess(argv, cwd=cwd, env=env) as process:
        status = process.wait_exit(timeout)
        return status, process.output


def python_executable() -> str:
    """The interpreter the examples run with: ``PERSONALIZE_EXAMPLE_PYTHON`` (CI points it
    at a fresh virtual environment made with the README's install line), else this one."""
    return os.environ.get("PERSONALIZE_EXAMPLE_PYTHON") or sys.executable
