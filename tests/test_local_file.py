"""The local experiences file: loading JSON and YAML, and strict errors naming file,
experience and field."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from personalize_middleware import ConfigurationError, Experience
from personalize_middleware.local import (
    ExperiencesFile,
    LocalBackend,
    load_experiences_file,
    load_sample_file,
    parse_experiences,
    sample_file_path,
)


def valid_data() -> dict[str, Any]:
    return {
        "users": {"alice": {"tier": "gold", "u_em": "alice@example.com"}},
        "experiences": [
            {
                "key": "hero-banner",
                "name": "Hero banner",
                "status": "Active",
                "experience_type": "API based Experience",
                "audiences": [
                    {
                        "name": "Gold",
                        "id": "5A",
                        "rules": [{"user": "tier", "equals": "gold"}],
                        "variations": [
                            {
                                "weight": 100,
                                "payload": {"Title": {"value": "Hi", "data_type": "string"}},
                            }
                        ],
                    },
                    {
                        "name": "All Users",
                        "variations": [
                            {
                                "id": "1",
                                "weight": 40,
                                "payload": {
                                    "Count": {"value": "3", "data_type": "number"},
                                    "Price": {"value": 9.5, "data_type": "float"},
                                    "Show": {"value": True, "data_type": "boolean"},
                                    "Meta": {"value": {"a": [1, 2]}, "data_type": "json"},
                                    "List": {"value": "[1, 2]", "data_type": "json"},
                                },
                            },
                            {"id": "2", "weight": 60, "payload": {}},
                        ],
                    },
                ],
            },
            {
                "key": "paused-one",
                "name": "Paused",
                "status": "Paused",
                "audiences": [{"name": "All", "variations": [{"payload": {}}]}],
            },
        ],
    }


def write(tmp_path: Path, data: Any, name: str = "experiences.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def load_error(tmp_path: Path, data: Any, name: str = "experiences.json") -> ConfigurationError:
    path = write(tmp_path, data, name)
    with pytest.raises(ConfigurationError) as info:
        load_experiences_file(path)
    assert str(info.value).startswith(f"{path}: "), str(info.value)
    return info.value


def test_valid_json_file_loads_with_defaults_filled_in(tmp_path: Path) -> None:
    loaded = load_experiences_file(write(tmp_path, valid_data()))
    assert isinstance(loaded, ExperiencesFile)
    assert list(loaded.experiences) == ["hero-banner", "paused-one"]
    hero = loaded.experiences["hero-banner"]
    assert hero.type == "Web Personalization"
    assert hero.experience_type == "API based Experience"
    assert hero.audiences[0].id == "5A"
    # An audience without an id gets a stable derived one; a variation without one gets 1, 2..
    assert hero.audiences[1].id.isalnum()
    assert hero.audiences[0].variations[0].id == "1"
    assert loaded.users["alice"]["tier"] == "gold"
    assert loaded.experiences["paused-one"].audiences[0].variations[0].weight == 100.0


def test_payload_values_are_kept_in_the_wire_shape_that_experience_parses(tmp_path: Path) -> None:
    loaded = load_experiences_file(write(tmp_path, valid_data()))
    payload = loaded.experiences["hero-banner"].audiences[1].variations[0].payload
    # The API's schema allows only a string or an object as a value: scalars go as strings.
    assert payload["Count"] == {"value": "3", "data_type": "number"}
    assert payload["Price"] == {"value": "9.5", "data_type": "float"}
    assert payload["Show"] == {"value": "true", "data_type": "boolean"}
    assert payload["Meta"] == {"value": {"a": [1, 2]}, "data_type": "json"}
    assert payload["List"] == {"value": "[1, 2]", "data_type": "json"}
    experience = Experience.from_api(
        "hero-banner", {"payload": {k: dict(v) for k, v in payload.items()}}
    )
    assert experience.payload == {
        "Count": 3,
        "Price": 9.5,
        "Show": True,
        "Meta": {"a": [1, 2]},
        "List": [1, 2],
    }


def test_yaml_file_loads_like_json(tmp_path: Path) -> None:
    path = tmp_path / "experiences.yaml"
    path.write_text(
        """
users:
  "1001": {tier: gold}
experiences:
  - key: promo
    name: Promo
    status: Active
    audiences:
      - name: Everyone
        id: 7
        rules:
          - {session: utm_medium, equals: email}
          - hour: {gte: 9, lt: 17}
        variations:
          - id: 2
            weight: 100
            payload:
              Headline: {value: Hello, data_type: string}
""",
        encoding="utf-8",
    )
    loaded = load_experiences_file(path)
    audience = loaded.experiences["promo"].audiences[0]
    assert audience.id == "7"
    assert audience.variations[0].id == "2"
    assert loaded.source == str(path)
    assert "1001" in loaded.users


def test_yml_extension_and_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yml"
    path.write_text("experiences:\n  - key: [unclosed\n", encoding="utf-8")
    with pytest.raises(ConfigurationError, match=r"broken\.yml: not valid YAML: line \d+"):
        load_experiences_file(path)


def test_yaml_without_pyyaml_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "experiences.yaml"
    path.write_text("experiences: []\n", encoding="utf-8")
    monkeypatch.setitem(sys.modules, "yaml", None)  # makes `import yaml` raise ImportError
    with pytest.raises(ConfigurationError, match=r"pip install personalize-middleware\[yaml\]"):
        load_experiences_file(path)


def test_json_syntax_error_names_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "experiences.json"
    path.write_text('{"experiences": [\n  {"key": }\n]}', encoding="utf-8")
    with pytest.raises(ConfigurationError, match=r"experiences\.json: not valid JSON: line 2"):
        load_experiences_file(path)


def test_missing_file_and_unknown_extension(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"missing\.json: cannot read the file"):
        load_experiences_file(tmp_path / "missing.json")
    (tmp_path / "experiences.toml").write_text("", encoding="utf-8")
    with pytest.raises(ConfigurationError, match=r"unsupported file type '\.toml'"):
        load_experiences_file(tmp_path / "experiences.toml")


def mutate(change: Any) -> dict[str, Any]:
    data = valid_data()
    change(data)
    return data


def _hero(data: dict[str, Any]) -> dict[str, Any]:
    experience: dict[str, Any] = data["experiences"][0]
    return experience


def _set(path: str, value: Any) -> Any:
    """A change setting ``experiences[0]`` + dotted/indexed ``path`` to ``value``."""

    def change(data: dict[str, Any]) -> None:
        target: Any = _hero(data)
        parts = path.replace("[", ".").replace("]", "").split(".")
        for part in parts[:-1]:
            target = target[int(part)] if part.isdigit() else target[part]
        last = parts[-1]
        if value is _DELETE:
            del target[int(last) if last.isdigit() else last]
        else:
            target[int(last) if last.isdigit() else last] = value

    return change


_DELETE = object()


@pytest.mark.parametrize(
    ("path", "value", "field", "message"),
    [
        ("status", "active", "status", "must be one of Active, Paused, Scheduled"),
        ("name", "", "name", "must be a non-empty string"),
        ("type", "Banner", "type", "Web Personalization"),
        ("audience", [], "audience", "unknown field"),
        ("audiences", [], "audiences", "non-empty list"),
        ("audiences[0].name", 3, "audiences[0].name", "non-empty string"),
        ("audiences[0].id", "no spaces", "audiences[0].id", "letters, digits"),
        ("audiences[1].id", "5A", "audiences[1].id", "duplicate audience id"),
        ("audiences[0].variations", [], "audiences[0].variations", "non-empty list"),
        (
            "audiences[1].variations[1].weight",
            "60",
            "audiences[1].variations[1].weight",
            "must be a number 0..100",
        ),
        (
            "audiences[1].variations[1].weight",
            160,
            "audiences[1].variations[1].weight",
            "must be a number 0..100",
        ),
        (
            "audiences[1].variations[1].weight",
            50,
            "audiences[1].variations",
            "weights must add up to 100 (they add up to 90)",
        ),
        (
            "audiences[1].variations[1].weight",
            _DELETE,
            "audiences[1].variations[1].weight",
            "required when another variation",
        ),
        ("audiences[1].variations[1].id", "1", "audiences[1].variations[1].id", "duplicate id"),
        (
            "audiences[1].variations[0].payload.Count.value",
            "three",
            "audiences[1].variations[0].payload.Count.value",
            "does not convert to number",
        ),
        (
            "audiences[1].variations[0].payload.Show.value",
            "yes",
            "audiences[1].variations[0].payload.Show.value",
            "does not convert to boolean",
        ),
        (
            "audiences[1].variations[0].payload.Meta.value",
            "{not json",
            "audiences[1].variations[0].payload.Meta.value",
            "does not convert to json",
        ),
        (
            "audiences[1].variations[0].payload.Count.data_type",
            "integer",
            "audiences[1].variations[0].payload.Count.data_type",
            "must be one of string, number, float, boolean, json",
        ),
        (
            "audiences[1].variations[0].payload.Count",
            "3",
            "audiences[1].variations[0].payload.Count",
            "value and data_type",
        ),
        (
            "audiences[0].rules",
            [{"user": "tier", "equal": "gold"}],
            "audiences[0].rules[0].equal",
            "unknown field",
        ),
        (
            "audiences[0].rules",
            [{"user": "tier"}],
            "audiences[0].rules[0]",
            "needs an operator",
        ),
        (
            "audiences[0].rules",
            [{"user": "tier", "session": "x", "equals": 1}],
            "audiences[0].rules[0]",
            "exactly one of",
        ),
        (
            "audiences[0].rules",
            [{"day_of_week": "monday"}],
            "audiences[0].rules[0].day_of_week",
            "a day name",
        ),
        ("audiences[0].rules", [{"hour": 24}], "audiences[0].rules[0].hour", "0..23"),
        (
            "audiences[0].rules",
            [{"hour": {"gte": 9, "before": 3}}],
            "audiences[0].rules[0].hour.before",
            "unknown field",
        ),
        (
            "audiences[0].rules",
            [{"device": ["mobile", "phone"]}],
            "audiences[0].rules[0].device[1]",
            "mobile, tablet or desktop",
        ),
        (
            "audiences[0].rules",
            [{"identified": "yes"}],
            "audiences[0].rules[0].identified",
            "true or false",
        ),
        ("audiences[0].rules", [{"any": []}], "audiences[0].rules[0].any", "non-empty list"),
        (
            "audiences[0].rules",
            [{"not": {"user": "x", "gt": "a"}}],
            "audiences[0].rules[0].not.gt",
            "must be a number",
        ),
        (
            "audiences[0].rules",
            [{"session": "utm", "in": "email"}],
            "audiences[0].rules[0].in",
            "must be a list",
        ),
    ],
)
def test_each_bad_field_is_named_with_file_and_experience(
    tmp_path: Path, path: str, value: Any, field: str, message: str
) -> None:
    error = load_error(tmp_path, mutate(_set(path, value)))
    text = str(error)
    assert f": experience 'hero-banner': {field}: " in text, text
    assert message in text, text
    assert error.field == field


def test_the_issue_example_message_shape(tmp_path: Path) -> None:
    data = mutate(_set("audiences[1].variations[1].weight", -5))
    path = write(tmp_path, data, "experiences.json")
    with pytest.raises(ConfigurationError) as info:
        load_experiences_file(path)
    assert str(info.value) == (
        f"{path}: experience 'hero-banner': audiences[1].variations[1].weight: "
        "must be a number 0..100"
    )


def test_experience_without_a_usable_key_is_named_by_position(tmp_path: Path) -> None:
    data = valid_data()
    del data["experiences"][1]["key"]
    error = load_error(tmp_path, data)
    assert ": experiences[1]: key: must be a non-empty string" in str(error)


def test_duplicate_experience_keys_are_refused(tmp_path: Path) -> None:
    data = valid_data()
    data["experiences"].append(copy.deepcopy(data["experiences"][0]))
    error = load_error(tmp_path, data)
    assert "experience 'hero-banner': key: duplicate experience key" in str(error)


def test_campaign_ids_must_be_unique_because_events_map_back_through_them(
    tmp_path: Path,
) -> None:
    data = valid_data()
    data["experiences"][0]["campaign_id"] = "abc123"
    data["experiences"][1]["campaign_id"] = "abc123"
    error = load_error(tmp_path, data)
    assert "experience 'paused-one': campaign_id: used by another experience" in str(error)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "the top level must be a mapping"),
        ({"experiences": {}}, "experiences: must be a list"),
        ({"experience": []}, "experience: unknown field"),
        ({"users": [], "experiences": []}, "users: must be a mapping"),
        ({"users": {"bob": "gold"}, "experiences": []}, "users.bob: must be a mapping"),
        ({"experiences": ["hero"]}, "experiences[0]: must be a mapping"),
    ],
)
def test_top_level_mistakes_name_the_file_and_field(
    tmp_path: Path, data: Any, message: str
) -> None:
    assert message in str(load_error(tmp_path, data))


def test_yaml_numeric_customer_id_asks_for_quotes(tmp_path: Path) -> None:
    path = tmp_path / "e.yaml"
    path.write_text("users:\n  1001: {tier: gold}\nexperiences: []\n", encoding="utf-8")
    with pytest.raises(ConfigurationError, match="quote 1001"):
        load_experiences_file(path)


def test_even_split_when_no_weights_are_given() -> None:
    data = valid_data()
    data["experiences"][0]["audiences"][1]["variations"] = [
        {"id": "1", "payload": {}},
        {"id": "2", "payload": {}},
        {"id": "3", "payload": {}},
    ]
    loaded = parse_experiences(data)
    weights = [v.weight for v in loaded.experiences["hero-banner"].audiences[1].variations]
    assert weights == pytest.approx([100 / 3] * 3)


def test_parse_experiences_names_a_generic_source_for_in_memory_data() -> None:
    data = mutate(_set("status", "Live"))
    with pytest.raises(ConfigurationError, match=r"^<data>: experience 'hero-banner': status"):
        parse_experiences(data)
    with pytest.raises(ConfigurationError, match=r"^<data>: experience 'hero-banner': status"):
        LocalBackend(data)


def test_packaged_sample_file_is_valid_and_covers_every_data_type() -> None:
    sample = load_sample_file()
    assert Path(sample_file_path()).is_file()
    assert {"hero-banner", "sidebar-promo", "product-upsell", "email-landing-banner"} <= set(
        sample.experiences
    )
    statuses = {d.status for d in sample.experiences.values()}
    assert statuses == {"Active", "Paused", "Scheduled"}
    data_types = {
        item["data_type"]
        for d in sample.experiences.values()
        for a in d.audiences
        for v in a.variations
        for item in v.payload.values()
    }
    assert data_types == {"string", "number", "float", "boolean", "json"}


def test_the_documented_example_loads_and_behaves_as_documented(tmp_path: Path) -> None:
    docs = Path(__file__).resolve().parents[1] / "docs" / "local-experiences.md"
    text = docs.read_text(encoding="utf-8")
    example = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "experiences.yaml"
    path.write_text(example, encoding="utf-8")
    backend = LocalBackend(path)
    wire = backend.evaluate(["hero-banner"], customer_id="alice")
    context = wire["hero-banner"]["experience_context"]
    documented = json.loads(text.split("```json\n", 1)[1].split("```", 1)[0])
    assert context == documented["experiences"]["hero-banner"]["experience_context"]
    by_email = backend.evaluate(["hero-banner"], user_identifiers={"u_em": "alice@example.com"})
    assert by_email["hero-banner"]["experience_context"]["audience_id"] == "5A"
