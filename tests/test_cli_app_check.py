"""`check --app` checks an app in local mode against that app's own experiences file."""

from __future__ import annotations

import pytest

from personalize_middleware.cli import main


def test_check_app_uses_the_apps_local_experiences(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MOENGAGE_WORKSPACE_ID", raising=False)
    monkeypatch.delenv("MOENGAGE_API_SECRET", raising=False)
    code = main(["check", "--app", "example_app.main:app", "--strict"])
    out = capsys.readouterr().out
    assert "the app's local experiences" in out
    assert "ok        home-hero" in out
    assert "scheduled winter-sale" in out
    assert code == 1  # --strict: a Scheduled key fails the check
    assert main(["check", "--app", "example_app.main:app"]) == 0


def test_check_app_against_another_file_reports_typos(capsys: pytest.CaptureFixture[str]) -> None:
    from personalize_middleware.local import sample_file_path

    code = main(["check", "--app", "example_app.main:app", "--file", str(sample_file_path())])
    out = capsys.readouterr().out
    assert code == 1
    assert "did you mean 'email-landing-banner'?" in out
