"""Where photos come from: files, folders, and resources inside installed packages.

A photo reference is either a path (absolute, or relative to a root folder) or
``package:<module-or-distribution>/<resource path>``, for example
``package:skimage/data/astronaut.png``. The second form lets a demo manifest work on
a fresh machine: the photo ships inside a package that is installed anyway.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.resources
import re
from dataclasses import dataclass
from importlib.resources.abc import Traversable
from pathlib import Path, PurePosixPath

from facegrid import names

PACKAGE_PREFIX = "package:"
# The formats the gateway accepts (common.proto); folders are scanned for these.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})
# external_image_id: the services' pattern (facegrid.names), matched with fullmatch.
EXTERNAL_ID_PATTERN = names.EXTERNAL_IMAGE_ID
_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-:]+")
MAX_EXTERNAL_ID = 255


class PhotoError(ValueError):
    """A photo reference that is malformed or names no file."""


@dataclass(frozen=True)
class Photo:
    """A resolved photo: what the user wrote, and the file it names."""

    reference: str
    location: Traversable

    @property
    def name(self) -> str:
        """The file name, the basis of the default external image id."""
        return self.location.name

    def read_bytes(self) -> bytes:
        try:
            return self.location.read_bytes()
        except OSError as error:
            raise PhotoError(f"{self.reference}: cannot read ({error.strerror or error})") from None


def resolve_photo(reference: str, root: Path) -> Photo:
    """The photo that ``reference`` names; relative paths are taken from ``root``.

    Raises :class:`PhotoError` when the reference is malformed or the file is missing.
    """
    if reference.startswith(PACKAGE_PREFIX):
        location = _package_resource(reference)
    else:
        if not reference.strip():
            raise PhotoError("empty photo path")
        path = Path(reference).expanduser()
        location = path if path.is_absolute() else root / path
    if not location.is_file():
        raise PhotoError(f"{reference}: no such file ({location})")
    return Photo(reference, location)


def _package_resource(reference: str) -> Traversable:
    spec = reference[len(PACKAGE_PREFIX) :]
    package, _, resource = spec.partition("/")
    parts = PurePosixPath(resource).parts
    if not package or not parts:
        raise PhotoError(
            f"{reference}: expected package:<package>/<path>, e.g. "
            "package:skimage/data/astronaut.png"
        )
    if resource.startswith("/") or any(part in ("..", ".") for part in parts):
        raise PhotoError(f"{reference}: the resource path must stay inside the package")
    try:
        base: Traversable = importlib.resources.files(package)
    except (ModuleNotFoundError, TypeError, ValueError):
        # Not an importable module: perhaps a distribution name such as scikit-image,
        # whose files are named relative to the folder it is installed in.
        try:
            distribution = importlib.metadata.distribution(package)
        except importlib.metadata.PackageNotFoundError:
            raise PhotoError(
                f"{reference}: no installed module or distribution {package!r}"
            ) from None
        return Path(str(distribution.locate_file(resource)))
    location = base
    for part in parts:
        location = location.joinpath(part)
    return location


def safe_external_id(name: str) -> str:
    """An ``external_image_id`` from a file name: unsafe runs become ``_``, at most 255."""
    cleaned = _UNSAFE.sub("_", name).strip("_") or "image"
    if len(cleaned) <= MAX_EXTERNAL_ID:
        return cleaned
    # Keep the end, where the distinguishing part and the extension usually are.
    return cleaned[-MAX_EXTERNAL_ID:]


def content_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
