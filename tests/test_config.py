"""PersonalizeSettings: validation, URL building, from_env, and a repr that hides secrets."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from personalize_middleware import ConfigurationError, PersonalizeSettings
from personalize_middleware._config import (
    DATA_CENTERS,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_READ_TIMEOUT,
)

SECRET = "very-secret-value-42"
GOOD: dict[str, Any] = {"workspace_id": "WS_01-abc", "api_secret": SECRET}


def make(**overrides: Any) -> PersonalizeSettings:
    return PersonalizeSettings(**(GOOD | overrides))


def test_defaults() -> None:
    settings = make()
    assert settings.data_center == "01"
    assert settings.api_base_url == "https://sdk-01.moengage.com/v1"
    assert settings.connect_timeout == DEFAULT_CONNECT_TIMEOUT
    assert settings.read_timeout == DEFAULT_READ_TIMEOUT
    assert settings.max_connections == DEFAULT_MAX_CONNECTIONS
    assert settings.base_url is None and settings.redis_url is None


@pytest.mark.parametrize("dc", DATA_CENTERS)
def test_every_data_center_builds_its_url(dc: str) -> None:
    assert make(data_center=dc).api_base_url == f"https://sdk-{dc}.moengage.com/v1"


@pytest.mark.parametrize(("given", "normalised"), [("1", "01"), (" 02 ", "02"), (101, "101")])
def test_data_center_is_normalised(given: Any, normalised: str) -> None:
    assert make(data_center=given).data_center == normalised


@pytest.mark.parametrize(
    ("base_url", "api_base_url"),
    [
        ("http://127.0.0.1:8080/v1", "http://127.0.0.1:8080/v1"),
        ("https://proxy.example.com/moengage/v1/", "https://proxy.example.com/moengage/v1"),
        ("  http://localhost:9000  ", "http://localhost:9000"),
    ],
)
def test_base_url_overrides_the_data_center(base_url: str, api_base_url: str) -> None:
    settings = make(base_url=base_url, data_center="05")
    assert settings.api_base_url == api_base_url


@pytest.mark.parametrize(
    ("field_name", "value"),
    [
        ("workspace_id", ""),
        ("workspace_id", "has space"),
        ("workspace_id", "semi;colon"),
        ("workspace_id", "x" * 129),
        ("workspace_id", 12345),
        ("workspace_id", None),
        ("api_secret", ""),
        ("api_secret", "   "),
        ("api_secret", None),
        ("api_secret", b"bytes"),
        ("data_center", "07"),
        ("data_center", "0"),
        ("data_center", "eu"),
        ("data_center", ""),
        ("base_url", "ftp://example.com"),
        ("base_url", "sdk-01.moengage.com/v1"),
        ("base_url", ""),
        ("base_url", "http://"),
        ("connect_timeout", 0),
        ("connect_timeout", -1.0),
        ("connect_timeout", True),
        ("connect_timeout", "2"),
        ("read_timeout", 0),
        ("read_timeout", None),
        ("max_connections", 0),
        ("max_connections", 1.5),
        ("max_connections", True),
        ("redis_url", "http://localhost:6379"),
        ("redis_url", "localhost:6379"),
    ],
)
def test_each_bad_field_is_named(field_name: str, value: Any) -> None:
    with pytest.raises(ConfigurationError) as caught:
        make(**{field_name: value})
    assert caught.value.field == field_name
    assert field_name in str(caught.value)
    assert SECRET not in str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_valid_edge_values() -> None:
    settings = make(
        workspace_id="x" * 128,
        connect_timeout=0.01,
        read_timeout=60,
        max_connections=1,
        redis_url="unix:///tmp/redis.sock",
    )
    assert settings.max_connections == 1
    assert make(redis_url="rediss://user:pw@cache:6380/1").redis_url


def test_settings_are_frozen() -> None:
    settings = make()
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.api_secret = "other"  # type: ignore[misc]


def test_repr_never_shows_secrets() -> None:
    settings = make(redis_url="redis://:redis-password-9@cache:6379/0")
    text = repr(settings) + str(settings)
    assert SECRET not in text
    assert "redis-password-9" not in text
    assert "WS_01-abc" in text and "********" in text
    assert "redis=on" in text


ENV = {
    "MOENGAGE_WORKSPACE_ID": "WSENV",
    "MOENGAGE_API_SECRET": SECRET,
    "MOENGAGE_DATA_CENTER": "03",
    "MOENGAGE_BASE_URL": "http://127.0.0.1:7000/v1",
    "MOENGAGE_REDIS_URL": "redis://127.0.0.1:6379/0",
}


def test_from_env_reads_every_variable() -> None:
    settings = PersonalizeSettings.from_env(ENV)
    assert settings.workspace_id == "WSENV"
    assert settings.api_secret == SECRET
    assert settings.data_center == "03"
    assert settings.api_base_url == "http://127.0.0.1:7000/v1"
    assert settings.redis_url == "redis://127.0.0.1:6379/0"


def test_from_env_minimal_uses_defaults() -> None:
    env = {"MOENGAGE_WORKSPACE_ID": "WSENV", "MOENGAGE_API_SECRET": SECRET}
    settings = PersonalizeSettings.from_env(env)
    assert settings.api_base_url == "https://sdk-01.moengage.com/v1"
    assert settings.redis_url is None


def test_from_env_data_center_only() -> None:
    env = {"MOENGAGE_WORKSPACE_ID": "W", "MOENGAGE_API_SECRET": SECRET}
    settings = PersonalizeSettings.from_env(env | {"MOENGAGE_DATA_CENTER": "101"})
    assert settings.api_base_url == "https://sdk-101.moengage.com/v1"


@pytest.mark.parametrize(
    ("missing", "field_name"),
    [("MOENGAGE_WORKSPACE_ID", "workspace_id"), ("MOENGAGE_API_SECRET", "api_secret")],
)
@pytest.mark.parametrize("how", ["absent", "blank"])
def test_from_env_missing_credentials(missing: str, field_name: str, how: str) -> None:
    env = dict(ENV)
    if how == "absent":
        del env[missing]
    else:
        env[missing] = "   "
    with pytest.raises(ConfigurationError) as caught:
        PersonalizeSettings.from_env(env)
    assert caught.value.field == field_name
    assert missing in str(caught.value)
    assert SECRET not in str(caught.value)


def test_from_env_bad_value_names_the_field() -> None:
    with pytest.raises(ConfigurationError) as caught:
        PersonalizeSettings.from_env(ENV | {"MOENGAGE_DATA_CENTER": "99"})
    assert caught.value.field == "data_center"


def test_from_env_overrides_win() -> None:
    settings = PersonalizeSettings.from_env(ENV, base_url=None, read_timeout=1.5)
    assert settings.api_base_url == "https://sdk-03.moengage.com/v1"
    assert settings.read_timeout == 1.5
    missing_secret = {k: v for k, v in ENV.items() if k != "MOENGAGE_API_SECRET"}
    assert PersonalizeSettings.from_env(missing_secret, api_secret="given").api_secret == "given"


def test_from_env_defaults_to_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    assert not PersonalizeSettings.env_has_credentials()
    with pytest.raises(ConfigurationError):
        PersonalizeSettings.from_env()
    monkeypatch.setenv("MOENGAGE_WORKSPACE_ID", "FROMOS")
    monkeypatch.setenv("MOENGAGE_API_SECRET", SECRET)
    assert PersonalizeSettings.env_has_credentials()
    assert PersonalizeSettings.from_env().workspace_id == "FROMOS"


def test_env_has_credentials_needs_both() -> None:
    assert PersonalizeSettings.env_has_credentials(ENV)
    assert not PersonalizeSettings.env_has_credentials({"MOENGAGE_WORKSPACE_ID": "W"})
    assert not PersonalizeSettings.env_has_credentials(
        {"MOENGAGE_WORKSPACE_ID": "W", "MOENGAGE_API_SECRET": " "}
    )
