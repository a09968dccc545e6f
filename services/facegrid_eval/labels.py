"""Labelled photo sets: who is in which photo, for evaluation and calibration.

Two ways to label photos, usable together:

* a folder of ``<person>/`` subfolders: each photo shows that person, and one face
  found in it is the labelled one (other faces in it are ignored): by default the one
  nearest the photo's centre, which is how LFW defines its labels (its photos are
  centred on the labelled person; in 102 of lfw-dev's 6,922 a bystander's face is the
  larger), or with ``--face largest`` the largest, as SearchFacesByImage picks its
  probe;
* a TOML label manifest, for photos with several faces. Faces are labelled left to
  right by the centre of their box, and every face the detector finds must be
  labelled, so that labels cannot silently shift onto the wrong face::

      description = "what the set is"

      [gallery]                    # enrolled people (identification gallery)
      folders = ["train"]          # <folder>/<person>/<photo>

      [[photo]]
      path = "test/obama_and_biden.jpg"     # relative to the set's root
      faces = ["biden", "obama", "?"]       # "?": a person not labelled anywhere
      sha256 = "b8781c1f..."                # optional: the labelled file's contents
      role = "probe"                        # or "gallery"; default "probe"
      upsample = 1                          # optional: detector upsampling, 0-2
      source = "other/photo.jpg"            # optional: same capture as that photo
      sources = ["a.jpg", "b.jpg#1"]        # or per face (e.g. a collage)

``"?"`` marks a face of someone not among the labelled people (an unenrolled person a
correct system rejects); ``"-"`` marks a detection to leave out. A *source* says which
capture a face comes from: faces of one source (the same photo resized, cropped or
re-encoded) are never paired with each other as two photos of a person. By default a
face's source is its photo's path (``path#i`` for the i-th face of a multi-face photo).
"""

from __future__ import annotations

import hashlib
import tomllib
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path, PurePosixPath
from typing import Any

UNKNOWN = "?"
IGNORE = "-"
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})
MANIFEST_NAME = "labels.toml"
# Label manifests shipped with the project (seeds/eval/<folder name>.toml).
PROJECT_SEEDS = Path(__file__).resolve().parents[3] / "seeds" / "eval"
_PHOTO_KEYS = frozenset({"path", "faces", "sha256", "role", "upsample", "source", "sources"})
_TOP_KEYS = frozenset({"description", "gallery", "probes", "photo"})


class LabelError(ValueError):
    """A label manifest or photo folder that cannot be used as it is."""


class Role(StrEnum):
    GALLERY = "gallery"
    PROBE = "probe"


@dataclass(frozen=True)
class LabelledPhoto:
    path: str  # relative to the set's root, POSIX form
    labels: tuple[str, ...]  # one per face, left to right by box centre
    role: Role
    sources: tuple[str, ...]  # one per face
    upsample: int | None = None
    single_face: bool = False  # folder photos: one face (largest or central) is labelled

    @property
    def people(self) -> set[str]:
        return {label for label in self.labels if label not in (UNKNOWN, IGNORE)}


@dataclass(frozen=True)
class LabelSet:
    root: Path
    photos: tuple[LabelledPhoto, ...]
    origin: str  # where the labels came from, for reports
    description: str = ""

    @property
    def people(self) -> list[str]:
        return sorted(set().union(*(photo.people for photo in self.photos)))

    @property
    def shown_origin(self) -> str:
        """Where the labels came from, relative to the working directory if below it."""
        path = Path(self.origin)
        if path.is_absolute() and path.is_relative_to(Path.cwd()):
            return path.relative_to(Path.cwd()).as_posix()
        return self.origin


def discover(root: Path, labels: Path | None = None) -> LabelSet:
    """The labels of ``root``: a given manifest, ``root/labels.toml``, a bundled one, or
    the folder layout (``train/`` + ``test/`` person folders, or person folders)."""
    if not root.is_dir():
        raise LabelError(f"{root} is not a folder")
    if labels is not None:
        return load_manifest(labels, root)
    for candidate in [root / MANIFEST_NAME, *bundled_manifests(root)]:
        if candidate.is_file():
            return load_manifest(candidate, root)
    train, test = root / "train", root / "test"
    if train.is_dir() and test.is_dir():
        if not any(p.is_dir() for p in test.iterdir()):
            raise LabelError(
                f"{test} holds photos, not <person>/ folders: label them with a manifest "
                "(--labels FILE; see seeds/eval/knn.toml)"
            )
        photos = person_folder(root, "train", Role.GALLERY) + person_folder(
            root, "test", Role.PROBE
        )
        return LabelSet(root, tuple(photos), f"folders {train} and {test}")
    return LabelSet(root, tuple(person_folder(root, ".", Role.GALLERY)), f"folders in {root}")


def bundled_manifests(root: Path) -> list[Path]:
    """seeds/eval/<name of root>.toml, in this checkout or the working directory."""
    name = root.resolve().name
    return [folder / f"{name}.toml" for folder in (PROJECT_SEEDS, Path.cwd() / "seeds" / "eval")]


def person_folder(root: Path, folder: str, role: Role) -> list[LabelledPhoto]:
    """Photos in ``root/folder/<person>/``, each labelled with that person."""
    base = root / folder
    if not base.is_dir():
        raise LabelError(f"{base} is not a folder")
    photos = []
    for person_dir in sorted(p for p in base.iterdir() if p.is_dir()):
        if person_dir.name.startswith("."):
            continue
        _check_person(person_dir.name, str(person_dir))
        for file in sorted(person_dir.iterdir()):
            if file.is_file() and file.suffix.lower() in IMAGE_SUFFIXES:
                path = file.relative_to(root).as_posix()
                photos.append(
                    LabelledPhoto(path, (person_dir.name,), role, (path,), single_face=True)
                )
    if not photos:
        raise LabelError(f"no photos in person folders under {base}")
    return photos


def load_manifest(manifest: Path, root: Path) -> LabelSet:
    """Read a TOML label manifest whose paths are relative to ``root``."""
    try:
        document = tomllib.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise LabelError(f"{manifest}: {exc}") from exc
    _no_unknown_keys(document, _TOP_KEYS, str(manifest))
    photos: list[LabelledPhoto] = []
    for role, key in ((Role.GALLERY, "gallery"), (Role.PROBE, "probes")):
        section = document.get(key, {})
        _no_unknown_keys(section, frozenset({"folders"}), f"{manifest} [{key}]")
        for folder in section.get("folders", []):
            photos += person_folder(root, _relative(folder, f"{manifest} [{key}]"), role)
    for number, entry in enumerate(document.get("photo", []), start=1):
        photos.append(_photo(entry, root, f"{manifest} photo #{number}"))
    seen: set[str] = set()
    for photo in photos:
        if photo.path in seen:
            raise LabelError(f"{manifest}: {photo.path} is labelled twice")
        seen.add(photo.path)
    if not photos:
        raise LabelError(f"{manifest} labels no photos")
    return LabelSet(root, tuple(photos), str(manifest), str(document.get("description", "")))


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _photo(entry: dict[str, Any], root: Path, where: str) -> LabelledPhoto:
    _no_unknown_keys(entry, _PHOTO_KEYS, where)
    if "path" not in entry or "faces" not in entry:
        raise LabelError(f"{where}: 'path' and 'faces' are required")
    path = _relative(entry["path"], where)
    where = f"{where} ({path})"
    file = root / path
    if not file.is_file():
        raise LabelError(f"{where}: {file} does not exist")
    labels = entry["faces"]
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        raise LabelError(f"{where}: 'faces' must be a non-empty list of names")
    for label in labels:
        if label not in (UNKNOWN, IGNORE):
            _check_person(label, where)
    if "sha256" in entry and file_sha256(file) != str(entry["sha256"]).lower():
        raise LabelError(f"{where}: the file's contents differ from the labelled photo (sha256)")
    try:
        role = Role(entry.get("role", Role.PROBE))
    except ValueError:
        raise LabelError(f"{where}: role must be 'gallery' or 'probe'") from None
    upsample = entry.get("upsample")
    if upsample is not None and (not isinstance(upsample, int) or not 0 <= upsample <= 2):
        raise LabelError(f"{where}: upsample must be 0, 1 or 2")
    return LabelledPhoto(
        path, tuple(labels), role, _sources(entry, path, len(labels), where), upsample
    )


def _sources(entry: dict[str, Any], path: str, count: int, where: str) -> tuple[str, ...]:
    if "source" in entry and "sources" in entry:
        raise LabelError(f"{where}: give 'source' or 'sources', not both")
    if "sources" in entry:
        sources = entry["sources"]
        if not isinstance(sources, list) or len(sources) != count:
            raise LabelError(f"{where}: 'sources' needs one entry per face")
        return tuple(str(s) for s in sources)
    if "source" in entry:
        if count != 1:
            raise LabelError(f"{where}: 'source' is for one-face photos; use 'sources'")
        return (str(entry["source"]),)
    return (path,) if count == 1 else tuple(f"{path}#{i}" for i in range(count))


def _relative(value: object, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise LabelError(f"{where}: a path must be a non-empty string")
    path = PurePosixPath(value)
    if path.is_absolute() or ".." in path.parts:
        raise LabelError(f"{where}: {value!r} must be relative to the set's folder, without '..'")
    return path.as_posix()


def _check_person(name: str, where: str) -> None:
    if not name or name != name.strip() or name in (UNKNOWN, IGNORE):
        raise LabelError(f"{where}: {name!r} is not a usable person name")


def _no_unknown_keys(table: object, allowed: frozenset[str], where: str) -> None:
    if not isinstance(table, dict):
        raise LabelError(f"{where}: expected a table")
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise LabelError(f"{where}: unknown keys {unknown} (allowed: {sorted(allowed)})")
