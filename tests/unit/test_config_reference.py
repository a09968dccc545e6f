"""The configuration reference: complete, its variable names real, README's copy current."""

from __future__ import annotations

import argparse
import json
from enum import Enum
from pathlib import Path, PurePath
from typing import Any, Literal

import pytest
from facegrid import config_reference
from facegrid.config import (
    ENV_PREFIX,
    AutoQuality,
    InferenceBackendKind,
    Section,
    Settings,
)
from facegrid.config_reference import (
    END_MARKER,
    START_MARKER,
    Row,
    UndocumentedSettingError,
    escape_cell,
    extract_between_markers,
    reference_markdown,
    reference_rows,
    replace_between_markers,
)
from pydantic import BaseModel, Field
from pydantic_core import PydanticUndefined

README = Path(__file__).resolve().parents[2] / "README.md"


def _leaf_paths(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> list[str]:
    """Every leaf field of a model, found independently of the module under test."""
    paths: list[str] = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            paths.extend(_leaf_paths(annotation, (*prefix, name)))
        else:
            paths.append(".".join((*prefix, name)))
    return paths


def _value_at(settings: Settings, setting: str) -> Any:
    node: Any = settings
    for part in setting.split("."):
        node = getattr(node, part)
    return node


def _as_env(value: Any) -> str:
    if isinstance(value, Enum):
        return str(value.value)
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return json.dumps(value)
    return str(value)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No FACEGRID_* variables from the caller's environment."""
    import os

    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
    return monkeypatch


def test_every_setting_appears_once() -> None:
    rows = reference_rows()
    settings = [row.setting for row in rows]
    assert sorted(settings) == sorted(_leaf_paths(Settings))
    assert len(settings) == len(set(settings))
    assert "gateway.quality_low.min_face_size" in settings  # nested models are walked
    assert len({row.env_var for row in rows}) == len(rows)


def test_rows_follow_declaration_order() -> None:
    sections = list(dict.fromkeys(row.section for row in reference_rows()))
    assert sections == list(Settings.model_fields)


def test_env_var_names_follow_the_rule() -> None:
    for row in reference_rows():
        expected = ENV_PREFIX + "__".join(row.setting.split(".")).upper()
        assert row.env_var == expected


def test_defaults_are_those_of_a_default_settings(clean_env: pytest.MonkeyPatch) -> None:
    settings = Settings()
    for row in reference_rows():
        assert row.default_value == _value_at(settings, row.setting), row.setting
    # A nested model's defaults come from its section's default, not from its class.
    by_setting = {row.setting: row for row in reference_rows()}
    assert by_setting["gateway.quality_low.min_face_size"].default == "40"
    assert by_setting["gateway.quality_medium.min_face_size"].default == "60"


def test_defaults_are_rendered_readably() -> None:
    by_setting = {row.setting: row for row in reference_rows()}
    assert by_setting["gateway.audit_path"].default == "var/audit.db"  # Path: posix
    assert by_setting["inference.backend"].default == "local"  # enum: by value
    assert by_setting["gateway.min_similarity"].default == "unset"  # None
    assert by_setting["gateway.purpose_min_similarity"].default == "{}"  # dict: JSON
    assert by_setting["images.max_bytes"].default == str(15 * 1024 * 1024)  # bytes: int
    assert by_setting["store.token"].default == '""'
    assert by_setting["inference.backend"].type == "enum: local, triton"
    assert by_setting["gateway.audit_path"].type == "path"
    assert by_setting["gateway.min_similarity"].type == "float | None"
    assert by_setting["gateway.purpose_min_similarity"].type == "dict[str, float]"


@pytest.mark.parametrize(
    ("setting", "value", "expected"),
    [
        ("embedding.max_batch", "8", 8),
        ("inference.triton_timeout_s", "2.5", 2.5),
        ("inference.backend", "triton", InferenceBackendKind.TRITON),
        ("gateway.auto_quality", "high", AutoQuality.HIGH),
        ("gateway.audit_path", "/srv/facegrid/audit.db", Path("/srv/facegrid/audit.db")),
        ("gateway.min_similarity", "85", 85.0),
        ("gateway.quality_low.min_face_size", "77", 77),
        ("gateway.quality_high.max_yaw", "12.5", 12.5),
        ("gateway.purpose_min_similarity", '{"PURPOSE_TESTING": 90}', {"PURPOSE_TESTING": 90.0}),
        ("store.uri", "http://milvus:19530", "http://milvus:19530"),
    ],
)
def test_env_var_changes_its_setting(
    clean_env: pytest.MonkeyPatch, setting: str, value: str, expected: Any
) -> None:
    row = next(row for row in reference_rows() if row.setting == setting)
    assert _value_at(Settings(), setting) != expected
    clean_env.setenv(row.env_var, value)
    assert _value_at(Settings(), setting) == expected


def test_every_env_var_is_accepted(clean_env: pytest.MonkeyPatch) -> None:
    """Each variable, set to its default, is a known name (extra="forbid") for its setting."""
    for row in reference_rows():
        if row.default_value is None or row.default_value is PydanticUndefined:
            continue
        with clean_env.context() as env:
            env.setenv(row.env_var, _as_env(row.default_value))
            assert _value_at(Settings(), row.setting) == row.default_value, row.env_var


def test_one_nested_env_var_leaves_its_siblings_alone(clean_env: pytest.MonkeyPatch) -> None:
    before = Settings().gateway.quality_medium
    clean_env.setenv("FACEGRID_GATEWAY__QUALITY_MEDIUM__MIN_CONFIDENCE", "75")
    after = Settings().gateway.quality_medium
    assert after.min_confidence == 75
    assert after.model_copy(update={"min_confidence": before.min_confidence}) == before


def test_markdown_table_shape() -> None:
    rows = reference_rows()
    lines = reference_markdown().splitlines()
    assert lines[0] == "| setting | environment variable | default | meaning |"
    assert lines[1] == "|---|---|---|---|"
    assert len(lines) == 2 + len(rows)
    for line, row in zip(lines[2:], rows, strict=True):
        assert line.startswith(f"| `{row.setting}` | `{row.env_var}` | ")
        # four cells: unescaped pipes are only the delimiters
        assert line.replace("\\|", "").count("|") == 5
    assert "| unset |" in reference_markdown()  # None is a word, not a value


def test_markdown_escapes_pipes_and_newlines() -> None:
    assert escape_cell("a | b") == "a \\| b"
    assert escape_cell("already \\| escaped") == "already \\| escaped"
    assert escape_cell("two\nlines  and\tspaces") == "two lines and spaces"
    row = Row(
        setting="x.choice",
        env_var="FACEGRID_X__CHOICE",
        default="a|b",
        type="str",
        description="Either a|b or c.\nSecond line.",
        default_value="a|b",
    )
    line = reference_markdown([row]).splitlines()[2]
    assert line == (
        "| `x.choice` | `FACEGRID_X__CHOICE` | `a\\|b` | Either a\\|b or c. Second line. |"
    )


def test_enum_choices_are_listed() -> None:
    line = next(line for line in reference_markdown().splitlines() if "`inference.backend`" in line)
    assert "One of `local`, `triton`." in line


def test_literal_choices_are_listed_like_enums() -> None:
    class Inner(Section):
        fmt: Literal["json", "text"] = Field("json", description="Format")

    class Outer(Section):
        logs: Inner = Inner()

    (row,) = reference_rows(Outer)
    assert (row.setting, row.env_var, row.default) == ("logs.fmt", "FACEGRID_LOGS__FMT", "json")
    assert row.type == "enum: json, text"
    assert reference_markdown([row]).splitlines()[2].endswith("| Format. One of `json`, `text`. |")


def test_undocumented_setting_is_an_error() -> None:
    class Inner(Section):
        documented: int = Field(1, description="Fine.")
        bare: int = 2

    class Outer(Section):
        inner: Inner = Inner()

    with pytest.raises(UndocumentedSettingError, match=r"inner\.bare"):
        reference_rows(Outer)


def test_replace_between_markers() -> None:
    text = f"# Title\n\nBefore.\n\n{START_MARKER}\nold table\n{END_MARKER}\n\nAfter.\n"
    replaced = replace_between_markers(text, "| new |\n")
    assert replaced == f"# Title\n\nBefore.\n\n{START_MARKER}\n| new |\n{END_MARKER}\n\nAfter.\n"
    assert extract_between_markers(replaced) == "| new |\n"
    assert replace_between_markers(replaced, "| new |") == replaced  # idempotent
    with pytest.raises(ValueError, match="settings-reference"):
        replace_between_markers("no markers here", "body")
    with pytest.raises(ValueError, match="before"):
        replace_between_markers(f"{END_MARKER}\n{START_MARKER}\n", "body")
    with pytest.raises(ValueError, match="exactly one"):
        replace_between_markers(f"{START_MARKER}{END_MARKER}{START_MARKER}", "body")


def test_main_write_and_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{START_MARKER}\nstale\n{END_MARKER}\noutro\n")
    assert config_reference.main_write(readme, check=True) == 1
    assert "facegrid config reference --write README.md" in capsys.readouterr().err
    assert "stale" in readme.read_text()  # --check writes nothing

    assert config_reference.main_write(readme, check=False) == 0
    text = readme.read_text()
    assert text.startswith(f"intro\n{START_MARKER}\n")
    assert text.endswith(f"{END_MARKER}\noutro\n")
    assert extract_between_markers(text) == reference_markdown()
    assert config_reference.main_write(readme, check=True) == 0

    readme.write_text("no markers\n")
    assert config_reference.main_write(readme, check=True) == 2
    assert config_reference.main_write(tmp_path / "missing.md", check=False) == 2


def test_cli_registration(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="facegrid")
    config_reference.register(parser.add_subparsers())

    args = parser.parse_args(["config", "reference"])
    assert args.handler(args) == 0
    assert capsys.readouterr().out == reference_markdown()

    readme = tmp_path / "README.md"
    readme.write_text(f"{START_MARKER}\n{END_MARKER}\n")
    args = parser.parse_args(["config", "reference", "--check", str(readme)])
    assert args.handler(args) == 1
    args = parser.parse_args(["config", "reference", "--write", str(readme)])
    assert args.handler(args) == 0
    assert extract_between_markers(readme.read_text()) == reference_markdown()
    with pytest.raises(SystemExit):
        parser.parse_args(["config", "reference", "--write", "a", "--check", "b"])


def test_readme_reference_is_current() -> None:
    text = README.read_text(encoding="utf-8")
    missing = [marker for marker in (START_MARKER, END_MARKER) if marker not in text]
    assert not missing, (
        f"README.md lacks the settings reference marker(s) {' '.join(missing)}: "
        "add them where the reference belongs, then run "
        "`facegrid config reference --write README.md`"
    )
    assert extract_between_markers(text) == reference_markdown(), (
        "README.md's configuration reference is out of date with the settings code: "
        "run `facegrid config reference --write README.md`"
    )
