"""The configuration reference: every setting, its default and its environment variable.

Generated from :class:`facegrid.config.Settings`, so it cannot drift from the code: the
README carries the table between two markers, ``facegrid config reference --write
README.md`` rewrites it and ``tests/unit/test_config_reference.py`` fails when it is stale.
A setting without a description is an error here, so every new setting gets documented.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
import types
import typing
from dataclasses import dataclass
from enum import Enum
from pathlib import Path, PurePath
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from facegrid.config import ENV_NESTED_DELIMITER, ENV_PREFIX, Settings

START_MARKER = "<!-- settings-reference:start -->"
END_MARKER = "<!-- settings-reference:end -->"
WRITE_HINT = "run `facegrid config reference --write README.md`"


class UndocumentedSettingError(ValueError):
    """A settings field has no ``description``."""


@dataclass(frozen=True)
class Row:
    """One setting of the reference."""

    setting: str  # dotted path, e.g. "gateway.quality_low.min_face_size"
    env_var: str  # e.g. "FACEGRID_GATEWAY__QUALITY_LOW__MIN_FACE_SIZE"
    default: str  # rendered for people: "unset", "var/audit.db", "{}", "15728640"
    type: str  # e.g. "int", "path", "float | None", "enum: local, triton"
    description: str
    # The default itself: the field's value in a default Settings (PydanticUndefined
    # for a required field).
    default_value: Any = None

    @property
    def section(self) -> str:
        """The first part of the setting path."""
        return self.setting.split(".", 1)[0]


def reference_rows(settings_class: type[BaseModel] = Settings) -> list[Row]:
    """Every leaf setting in declaration order, recursing into nested models.

    Defaults come from the default *instances* (a section's ``default_factory`` may set
    a nested model's fields to other values than that model's class defaults).
    Raises UndocumentedSettingError for a field without a description (top-level
    sections excepted: they are headings, not settings).
    """
    rows: list[Row] = []
    for name, field in settings_class.model_fields.items():
        default = _field_default(field)
        if _is_model(field.annotation):
            rows.extend(_walk(_model_type(field.annotation), default, (name,), ""))
        else:
            rows.append(_row((name,), field, default, ""))
    return rows


def reference_markdown(rows: list[Row] | None = None) -> str:
    """The reference as a markdown table (setting, environment variable, default, meaning)."""
    rows = reference_rows() if rows is None else rows
    lines = [
        "| setting | environment variable | default | meaning |",
        "|---|---|---|---|",
    ]
    for section in _sections_in_order(rows):
        for row in (r for r in rows if r.section == section):
            cells = [
                _code(row.setting),
                _code(row.env_var),
                _default_cell(row),
                escape_cell(_meaning(row)),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def escape_cell(text: str) -> str:
    """Make text safe inside one markdown table cell: one line, ``|`` escaped."""
    one_line = " ".join(text.split())
    return one_line.replace("\\|", "|").replace("|", "\\|")


def replace_between_markers(text: str, body: str) -> str:
    """Put ``body`` between the reference markers of ``text`` (ValueError if they are missing)."""
    start, end = _marker_span(text)
    inner = body if body.endswith("\n") else body + "\n"
    return text[:start] + "\n" + inner + text[end:]


def extract_between_markers(text: str) -> str:
    """What stands between the reference markers, without the newline after the start one."""
    start, end = _marker_span(text)
    return text[start:end].removeprefix("\n")


def main_write(readme: Path, check: bool) -> int:
    """Rewrite README's reference block; with ``check``, only report whether it is current.

    Returns 0 when the block is (now) current, 1 when ``check`` finds it stale (a diff
    goes to stderr), 2 when the file or its markers are missing.
    """
    try:
        text = readme.read_text(encoding="utf-8")
        updated = replace_between_markers(text, reference_markdown())
    except (OSError, ValueError) as error:
        print(f"{readme}: {error}", file=sys.stderr)
        return 2
    if updated == text:
        print(f"{readme}: settings reference is up to date")
        return 0
    if check:
        diff = difflib.unified_diff(
            extract_between_markers(text).splitlines(keepends=True),
            extract_between_markers(updated).splitlines(keepends=True),
            fromfile=f"{readme} (settings reference)",
            tofile="settings code",
        )
        sys.stderr.writelines(diff)
        print(f"{readme}: settings reference is out of date; {WRITE_HINT}", file=sys.stderr)
        return 1
    readme.write_text(updated, encoding="utf-8")
    print(f"{readme}: settings reference updated")
    return 0


def register(commands: argparse._SubParsersAction[Any]) -> argparse._SubParsersAction[Any]:
    """Add ``facegrid config reference`` to the `facegrid` command.

    Returns the ``config`` sub-command's own sub-parsers, for further ``config`` commands.
    """
    config = commands.add_parser("config", help="inspect facegrid's settings")
    config_commands: argparse._SubParsersAction[Any] = config.add_subparsers(
        title="config commands"
    )
    reference = config_commands.add_parser(
        "reference",
        help="print the configuration reference (markdown), or write/check README's copy",
        description="Every setting with its environment variable, default and meaning, "
        "generated from the settings code. Without options the table goes to stdout; "
        f"--write and --check act on the block between {START_MARKER} and {END_MARKER}.",
    )
    target = reference.add_mutually_exclusive_group()
    target.add_argument(
        "--write", type=Path, metavar="PATH", help="rewrite the reference block of PATH"
    )
    target.add_argument(
        "--check",
        type=Path,
        metavar="PATH",
        help="exit 1 (with a diff) if the reference block of PATH is out of date",
    )
    reference.set_defaults(handler=_reference_command)
    return config_commands


def _reference_command(args: argparse.Namespace) -> int:
    if args.write is not None:
        return main_write(args.write, check=False)
    if args.check is not None:
        return main_write(args.check, check=True)
    sys.stdout.write(reference_markdown())
    return 0


# --- walking the models -------------------------------------------------------------


def _walk(model: type[BaseModel], instance: Any, path: tuple[str, ...], context: str) -> list[Row]:
    rows: list[Row] = []
    for name, field in model.model_fields.items():
        value = getattr(instance, name) if instance is not None else _field_default(field)
        sub_path = (*path, name)
        if _is_model(field.annotation):
            sub_context = _sentence(_description(sub_path, field))
            joined = f"{context} {sub_context}".strip()
            rows.extend(_walk(_model_type(field.annotation), value, sub_path, joined))
        else:
            rows.append(_row(sub_path, field, value, context))
    return rows


def _row(path: tuple[str, ...], field: FieldInfo, value: Any, context: str) -> Row:
    description = _description(path, field)
    return Row(
        setting=".".join(path),
        env_var=ENV_PREFIX + ENV_NESTED_DELIMITER.join(path).upper(),
        default=render_default(value),
        type=render_type(field.annotation),
        description=f"{context} {description}".strip(),
        default_value=value,
    )


def _description(path: tuple[str, ...], field: FieldInfo) -> str:
    if not field.description or not field.description.strip():
        raise UndocumentedSettingError(
            f"setting {'.'.join(path)} has no description: give its Field(...) a "
            "description= (it becomes the configuration reference's meaning column)"
        )
    return field.description.strip()


def _field_default(field: FieldInfo) -> Any:
    """The field's default (PydanticUndefined for a required field)."""
    return field.get_default(call_default_factory=True, validated_data={})


def _is_model(annotation: Any) -> bool:
    return _model_type(annotation) is not None


def _model_type(annotation: Any) -> Any:
    """The BaseModel class of an annotation (``Model`` or ``Model | None``), else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if _is_union(annotation):
        models = [_model_type(arg) for arg in typing.get_args(annotation)]
        found = [m for m in models if m is not None]
        return found[0] if len(found) == 1 else None
    return None


def _is_union(annotation: Any) -> bool:
    return isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union


# --- rendering ----------------------------------------------------------------------


def render_default(value: Any) -> str:
    """A default as a person would write it (and, but for "unset", as the env var takes it)."""
    if value is None:
        return "unset"
    if value is PydanticUndefined:
        return "required"
    if isinstance(value, Enum):
        return str(value.value)
    if isinstance(value, PurePath):
        return value.as_posix()
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value else '""'
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, BaseModel):
        return json.dumps(value.model_dump(mode="json"))
    if isinstance(value, dict | list | tuple):
        return json.dumps(value, default=str)
    return str(value)


def render_type(annotation: Any) -> str:
    """A short readable name of a field's type."""
    if annotation is None or annotation is type(None):
        return "None"
    if _is_union(annotation):
        return " | ".join(render_type(arg) for arg in typing.get_args(annotation))
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return "enum: " + ", ".join(str(member.value) for member in annotation)
    if isinstance(annotation, type) and issubclass(annotation, PurePath):
        return "path"
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return "enum: " + ", ".join(str(arg) for arg in typing.get_args(annotation))
    if origin is not None:
        args = ", ".join(render_type(arg) for arg in typing.get_args(annotation))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    return getattr(annotation, "__name__", str(annotation))


def _meaning(row: Row) -> str:
    if row.type.startswith("enum: "):
        choices = ", ".join(f"`{choice}`" for choice in row.type.removeprefix("enum: ").split(", "))
        return f"{_sentence(row.description)} One of {choices}."
    return row.description


def _sentence(text: str) -> str:
    text = text.strip()
    return text if text.endswith((".", "!", "?", ":")) else text + "."


def _default_cell(row: Row) -> str:
    if row.default_value is None or row.default_value is PydanticUndefined:
        return row.default  # "unset" / "required": words, not values
    return _code(row.default)


def _code(text: str) -> str:
    return f"`{escape_cell(text)}`"


def _sections_in_order(rows: list[Row]) -> list[str]:
    return list(dict.fromkeys(row.section for row in rows))


def _marker_span(text: str) -> tuple[int, int]:
    """(index just after the start marker, index of the end marker)."""
    if text.count(START_MARKER) != 1 or text.count(END_MARKER) != 1:
        raise ValueError(
            f"expected exactly one {START_MARKER} and one {END_MARKER} "
            f"(found {text.count(START_MARKER)} and {text.count(END_MARKER)})"
        )
    start = text.index(START_MARKER) + len(START_MARKER)
    end = text.index(END_MARKER)
    if end < start:
        raise ValueError(f"{END_MARKER} comes before {START_MARKER}")
    return start, end
