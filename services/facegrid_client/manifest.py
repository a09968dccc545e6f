"""Seed manifests: a TOML file naming a collection, its subjects and their photos.

The format is documented in ``seeds/README.md``. In short::

    format = 1
    [collection]
    id = "demo"
    [[subjects]]
    id = "eileen-collins"
    display_name = "Eileen Collins"
    [[photos]]
    path = "package:skimage/data/astronaut.png"
    subject = "eileen-collins"
    metadata = { source = "scikit-image sample data" }

Everything is checked before a single call is made, and every problem is reported at
once, each naming its entry (``[[photos]] #3, line 31``), so that a long manifest can be
fixed in one pass. Unknown keys are errors: a misspelt key would otherwise be ignored
silently.
"""

from __future__ import annotations

import datetime
import json
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from facegrid import limits, names, validation

from facegrid_client.photos import EXTERNAL_ID_PATTERN

FORMAT_VERSION = 1
# The services' own id patterns (facegrid.names), matched with fullmatch.
COLLECTION_ID_PATTERN = names.COLLECTION_ID
SUBJECT_ID_PATTERN = names.SUBJECT_ID
SOURCE_ID_PATTERN = names.SOURCE_ID
QUALITY_CHOICES = ("none", "auto", "low", "medium", "high")
MAX_METADATA_JSON_BYTES = validation.MAX_METADATA_BYTES  # the gateway's limit

TOP_KEYS = frozenset({"format", "root", "collection", "defaults", "subjects", "photos"})
COLLECTION_KEYS = frozenset({"id", "display_name", "description"})
DEFAULTS_KEYS = frozenset({"quality", "source_id", "max_faces", "metadata"})
SUBJECT_KEYS = frozenset({"id", "display_name", "metadata"})
PHOTO_KEYS = frozenset(
    {"path", "subject", "external_image_id", "source_id", "quality", "max_faces", "metadata"}
)


class ManifestError(ValueError):
    """A manifest that cannot be used, with every problem found in it."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = list(problems)
        listed = "\n".join(f"  {problem}" for problem in self.problems)
        super().__init__(f"{source}: invalid manifest\n{listed}")


@dataclass(frozen=True)
class CollectionSpec:
    id: str
    display_name: str = ""
    description: str = ""

    @property
    def name(self) -> str:
        return f"collections/{self.id}"


@dataclass(frozen=True)
class SubjectSpec:
    id: str
    display_name: str = ""
    metadata: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PhotoSpec:
    """One photo to index; ``entry`` says where it is written, for messages."""

    path: str
    entry: str
    subject_id: str = ""
    external_image_id: str = ""
    source_id: str = ""
    quality: str = "auto"
    max_faces: int = 0
    metadata: Mapping[str, Any] = field(default_factory=dict)
    min_face_size: int = 0  # 0: the detector's own (80 px)


@dataclass(frozen=True)
class Manifest:
    source: Path
    root: Path
    collection: CollectionSpec
    subjects: tuple[SubjectSpec, ...]
    photos: tuple[PhotoSpec, ...]


def load_manifest(path: Path, root: Path | None = None) -> Manifest:
    """Read and check a manifest file.

    ``root`` overrides the manifest's own ``root`` key (relative paths of photos are
    taken from it); by default ``root`` is resolved against the manifest's folder.
    Raises :class:`ManifestError` listing every problem.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ManifestError(str(path), [f"cannot read: {error.strerror or error}"]) from None
    return parse_manifest(text, source=path, root=root)


def parse_manifest(text: str, *, source: Path, root: Path | None = None) -> Manifest:
    """Check a manifest given as text; see :func:`load_manifest`."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ManifestError(str(source), [f"not valid TOML: {error}"]) from None
    checker = _Checker(text)
    manifest = checker.manifest(document, source, root)
    if checker.problems or manifest is None:
        raise ManifestError(str(source), checker.problems)
    return manifest


class _Checker:
    """Collects every problem of a manifest instead of stopping at the first."""

    def __init__(self, text: str) -> None:
        self.problems: list[str] = []
        self._lines = {
            "subjects": _header_lines(text, "subjects"),
            "photos": _header_lines(text, "photos"),
        }

    def problem(self, where: str, message: str) -> None:
        self.problems.append(f"{where}: {message}" if where else message)

    def entry(self, table: str, index: int, count: int) -> str:
        """``[[photos]] #3, line 31`` (counted from 1); the line only where the headers
        can be counted (not for inline arrays)."""
        lines = self._lines[table]
        if len(lines) == count:
            return f"[[{table}]] #{index + 1}, line {lines[index]}"
        return f"[[{table}]] #{index + 1}"

    def manifest(
        self, document: dict[str, Any], source: Path, root_override: Path | None
    ) -> Manifest | None:
        self.unknown_keys("", document, TOP_KEYS)
        version = document.get("format")
        if version is None:
            self.problem("", f'missing key "format" (write format = {FORMAT_VERSION})')
        elif version != FORMAT_VERSION:
            self.problem("format", f"unsupported format {version!r}; expected {FORMAT_VERSION}")

        root = self.root(document, source, root_override)
        collection = self.collection(document.get("collection"))
        defaults = self.defaults(document.get("defaults", {}))
        subjects = self.subjects(document.get("subjects", []))
        photos = self.photos(document.get("photos", []), defaults, {s.id for s in subjects})
        if collection is None:
            return None
        return Manifest(source, root, collection, tuple(subjects), tuple(photos))

    def root(self, document: dict[str, Any], source: Path, override: Path | None) -> Path:
        base = source.parent
        if override is not None:
            return override.expanduser()
        value = document.get("root")
        if value is None:
            return base
        if not isinstance(value, str) or not value:
            self.problem("root", "must be a non-empty string (a folder)")
            return base
        path = Path(value).expanduser()
        return path if path.is_absolute() else base / path

    def collection(self, value: Any) -> CollectionSpec | None:
        if value is None:
            self.problem("", 'missing table [collection] (with at least id = "...")')
            return None
        if not isinstance(value, dict):
            self.problem("collection", "must be a table")
            return None
        self.unknown_keys("[collection]", value, COLLECTION_KEYS)
        collection_id = self.string(value, "id", "[collection]", required=True)
        if collection_id and not COLLECTION_ID_PATTERN.fullmatch(collection_id):
            self.problem(
                "[collection] id",
                f"{collection_id!r} is not a collection id: 1 to 63 lowercase letters, "
                "digits and hyphens, starting with a letter, not ending with a hyphen",
            )
        display_name = self.string(
            value, "display_name", "[collection]", limit=limits.MAX_DISPLAY_NAME
        )
        description = self.string(
            value, "description", "[collection]", limit=limits.MAX_DESCRIPTION
        )
        return CollectionSpec(collection_id, display_name, description)

    def defaults(self, value: Any) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.problem("defaults", "must be a table")
            return {}
        self.unknown_keys("[defaults]", value, DEFAULTS_KEYS)
        return {
            "quality": self.quality(value, "[defaults]") or "auto",
            "source_id": self.source_id(value, "[defaults]"),
            "max_faces": self.max_faces(value, "[defaults]"),
            "metadata": self.metadata(value, "[defaults]"),
        }

    def subjects(self, value: Any) -> list[SubjectSpec]:
        if not isinstance(value, list):
            self.problem("subjects", "must be an array of tables ([[subjects]])")
            return []
        subjects: list[SubjectSpec] = []
        seen: set[str] = set()
        for index, item in enumerate(value):
            where = self.entry("subjects", index, len(value))
            if not isinstance(item, dict):
                self.problem(where, "must be a table")
                continue
            self.unknown_keys(where, item, SUBJECT_KEYS)
            subject_id = self.string(item, "id", where, required=True)
            if subject_id and not SUBJECT_ID_PATTERN.fullmatch(subject_id):
                self.problem(
                    where,
                    f"id {subject_id!r}: use 1 to 128 characters of letters, digits, "
                    "'_', '.', '-' and ':'",
                )
            elif subject_id in seen:
                self.problem(where, f"subject {subject_id!r} is declared twice")
            seen.add(subject_id)
            display_name = self.string(item, "display_name", where, limit=limits.MAX_DISPLAY_NAME)
            metadata = self.metadata(item, where)
            subjects.append(SubjectSpec(subject_id, display_name, metadata))
        return subjects

    def photos(
        self, value: Any, defaults: dict[str, Any], subject_ids: set[str]
    ) -> list[PhotoSpec]:
        if not isinstance(value, list):
            self.problem("photos", "must be an array of tables ([[photos]])")
            return []
        photos: list[PhotoSpec] = []
        seen: dict[tuple[str, str], str] = {}
        for index, item in enumerate(value):
            where = self.entry("photos", index, len(value))
            if not isinstance(item, dict):
                self.problem(where, "must be a table")
                continue
            self.unknown_keys(where, item, PHOTO_KEYS)
            path = self.string(item, "path", where, required=True)
            subject_id = self.string(item, "subject", where)
            if subject_id and subject_id not in subject_ids:
                self.problem(
                    where, f"subject {subject_id!r} is not declared in a [[subjects]] entry"
                )
            external_image_id = self.string(item, "external_image_id", where)
            if external_image_id and not EXTERNAL_ID_PATTERN.fullmatch(external_image_id):
                self.problem(
                    where,
                    f"external_image_id {external_image_id!r}: use at most 255 characters "
                    "of letters, digits, '_', '.', '-' and ':'",
                )
            own_max_faces = self.max_faces(item, where)
            if subject_id and own_max_faces > 1:
                self.problem(
                    where,
                    "max_faces must be 1 (or unset) with a subject: only the largest face "
                    "is associated with a subject",
                )
            metadata = {**defaults["metadata"], **self.metadata(item, where)}
            if _json_size(metadata) > MAX_METADATA_JSON_BYTES:
                self.problem(where, "metadata with [defaults] metadata exceeds 8 KiB as JSON")
            if path:
                key = (path, subject_id)
                if key in seen:
                    self.problem(where, f"the same photo and subject as {seen[key]}")
                seen[key] = where
            photos.append(
                PhotoSpec(
                    path=path,
                    entry=where,
                    subject_id=subject_id,
                    external_image_id=external_image_id,
                    source_id=self.source_id(item, where) or defaults["source_id"],
                    quality=self.quality(item, where) or defaults["quality"],
                    max_faces=0 if subject_id else own_max_faces or defaults["max_faces"],
                    metadata=metadata,
                )
            )
        return photos

    # -- field checks ------------------------------------------------------------------
    def unknown_keys(self, where: str, table: dict[str, Any], known: frozenset[str]) -> None:
        for key in table:
            if key not in known:
                self.problem(where, f"unknown key {key!r} (known keys: {', '.join(sorted(known))})")

    def string(
        self,
        table: dict[str, Any],
        key: str,
        where: str,
        *,
        required: bool = False,
        limit: int | None = None,
    ) -> str:
        value = table.get(key)
        if value is None:
            if required:
                self.problem(where, f"missing key {key!r}")
            return ""
        if not isinstance(value, str):
            self.problem(where, f"{key} must be a string, not {_toml_type(value)}")
            return ""
        if required and not value:
            self.problem(where, f"{key} must not be empty")
        if limit is not None and len(value) > limit:
            self.problem(where, f"{key} is longer than {limit} characters")
        return value

    def quality(self, table: dict[str, Any], where: str) -> str:
        value = table.get("quality")
        if value is None:
            return ""
        if value not in QUALITY_CHOICES:
            self.problem(where, f"quality {value!r}: use one of {', '.join(QUALITY_CHOICES)}")
            return ""
        return str(value)

    def source_id(self, table: dict[str, Any], where: str) -> str:
        value = self.string(table, "source_id", where)
        if value and not SOURCE_ID_PATTERN.fullmatch(value):
            self.problem(
                where,
                f"source_id {value!r}: use at most 128 characters of letters, digits, "
                "'_', '.', '-' and ':'",
            )
            return ""
        return value

    def max_faces(self, table: dict[str, Any], where: str) -> int:
        value = table.get("max_faces")
        if value is None:
            return 0
        if isinstance(value, bool) or not isinstance(value, int):
            self.problem(where, f"max_faces must be an integer, not {_toml_type(value)}")
            return 0
        if not 1 <= value <= limits.MAX_FACES_PER_IMAGE:
            self.problem(where, f"max_faces must be 1 to {limits.MAX_FACES_PER_IMAGE}")
            return 0
        return value

    def metadata(self, table: dict[str, Any], where: str) -> dict[str, Any]:
        value = table.get("metadata")
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.problem(where, f"metadata must be a table, not {_toml_type(value)}")
            return {}
        bad = _non_json_value(value)
        if bad:
            self.problem(
                where,
                f"metadata {bad}: values must be strings, numbers, booleans, arrays or "
                "tables (write dates as strings)",
            )
            return {}
        if _json_size(value) > MAX_METADATA_JSON_BYTES:
            self.problem(where, "metadata exceeds 8 KiB as JSON")
        return value


def _header_lines(text: str, table: str) -> list[int]:
    """1-based line numbers of the ``[[table]]`` headers, in order."""
    header = re.compile(rf"^\s*\[\[\s*{table}\s*\]\]")
    return [number for number, line in enumerate(text.splitlines(), 1) if header.match(line)]


def _toml_type(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return "a date or time"


def _non_json_value(value: Any, path: str = "") -> str:
    """The dotted path of the first value that JSON (a protobuf Struct) cannot hold."""
    if isinstance(value, dict):
        for key, item in value.items():
            found = _non_json_value(item, f"{path}.{key}" if path else str(key))
            if found:
                return found
        return ""
    if isinstance(value, list):
        for index, item in enumerate(value):
            found = _non_json_value(item, f"{path}[{index}]")
            if found:
                return found
        return ""
    if isinstance(value, datetime.date | datetime.time):
        return path or "(value)"
    return ""


def _json_size(value: Mapping[str, Any]) -> int:
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())
