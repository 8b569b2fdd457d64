"""What ships: the wheel carries the MIT text and the project URLs, and the floors CI
tests against are the ones pyproject.toml declares."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from tests.conftest import require_tool
from tests.support.processes import REPO_ROOT

PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def test_the_ci_floors_are_the_declared_minimums() -> None:
    declared = {
        re.split(r"[<>=!~ ]", requirement, maxsplit=1)[0].lower(): requirement
        for requirement in PYPROJECT["project"]["dependencies"]
    }
    pins = dict(
        line.split("==")
        for line in (REPO_ROOT / ".ci/floors.txt").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert set(pins) == set(declared), "every required dependency is tested at its floor"
    for name, version in pins.items():
        floor = re.search(r">=\s*([\d.]+)", declared[name])
        assert floor is not None, declared[name]
        as_tuple = [int(part) for part in floor.group(1).split(".")]
        pinned = [int(part) for part in version.split(".")]
        assert pinned == as_tuple + [0] * (len(pinned) - len(as_tuple)), (name, version)


@pytest.mark.slow
def test_regression_the_wheel_ships_the_license_text(tmp_path: Path) -> None:
    """The wheel said MIT and shipped no license text."""
    try:
        import hatchling  # noqa: F401
    except ImportError:
        require_tool(False, "hatchling (pip install -e '.[dev]')")
    build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run(
        [*build, "--wheel-dir", str(tmp_path), str(REPO_ROOT)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("personalize_middleware-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (license_name,) = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
        assert archive.read(license_name).startswith(b"MIT License")
        (metadata_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = archive.read(metadata_name).decode()
    assert "License-Expression: MIT" in metadata
    assert "License-File: LICENSE" in metadata
    for label in ("Homepage", "Documentation", "Changelog", "Issues", "Source"):
        assert f"Project-URL: {label}, https://" in metadata
