"""Snapshots of the in-memory index beside a Milvus Lite database, for a fast restart.

Rebuilding the index means reading every row back from Milvus Lite, which materialises
rows in Python: 198-289 s at 1,000,000 faces. So on a clean shutdown, once Milvus Lite
has closed (and flushed), the service writes every collection's rows and vectors here,
with a fingerprint of the database directory (each file's path, size and modification
time). At the next start the snapshot is read and deleted before the database opens:

- it is used only if the database directory still has that fingerprint (nothing wrote
  to it since: any write through Milvus Lite changes its manifest or WAL) and every
  file's SHA-256 matches what the snapshot recorded;
- the service then checks each collection against Milvus itself (its row count, and a
  sample of rows compared field by field and vector by vector) and rebuilds from Milvus
  any collection that does not match, or that the snapshot does not hold.

A snapshot is read at most once: after a crash there is none, and the index is rebuilt.
A shutdown after a Milvus write that failed part-way writes none either, since the
index may then differ from what Milvus holds. The files hold embeddings: they are
private to the service's user, like the database, and gone with it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from facegrid_search.cache import FaceCache
from facegrid_search.records import FaceRow

log = logging.getLogger(__name__)

FORMAT = 1
MANIFEST = "manifest.json"
# Milvus Lite's lock file is touched by every open, whatever else happens.
_IGNORED = {"LOCK"}
_CHUNK = 16 << 20
_FIELDS = [f.name for f in dataclasses.fields(FaceRow)]  # FaceRow's positional order


class SnapshotMismatchError(Exception):
    """The snapshot cannot be used; the message says why."""


def snapshot_path(database: Path) -> Path:
    return database.with_name(database.name + ".index")


def fingerprint(database: Path) -> str:
    """What the database directory holds, as path, size and mtime of each file."""
    lines = []
    for path in sorted(database.rglob("*")):
        if path.is_file() and path.name not in _IGNORED:
            stat = path.stat()
            lines.append(f"{path.relative_to(database)}\0{stat.st_size}\0{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def write(database: Path, caches: Mapping[str, FaceCache]) -> Path:
    """Write a snapshot of ``caches`` for the (closed) database; replaces any other."""
    started = time.monotonic()
    final = snapshot_path(database)
    staging = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(mode=0o700, parents=True)
    collections: dict[str, Any] = {}
    for number, (collection_id, cache) in enumerate(sorted(caches.items())):
        rows, vectors = cache.contents()
        vectors_file, rows_file = f"{number}.vectors.npy", f"{number}.rows.json"
        with _private_file(staging / vectors_file) as out:
            np.save(out, np.ascontiguousarray(vectors), allow_pickle=False)
        with _private_file(staging / rows_file) as out:
            out.write(json.dumps(_columns(rows), separators=(",", ":")).encode())
        collections[collection_id] = {
            "faces": len(rows),
            "dimension": cache.dimension,
            "files": {name: _sha256(staging / name) for name in (vectors_file, rows_file)},
            "vectors": vectors_file,
            "rows": rows_file,
        }
    manifest = {
        "format": FORMAT,
        "database": str(database),
        "database_fingerprint": fingerprint(database),
        "collections": collections,
    }
    with _private_file(staging / MANIFEST) as out:
        out.write(json.dumps(manifest, indent=1).encode())
    _sync_directory(staging)
    shutil.rmtree(final, ignore_errors=True)
    staging.rename(final)
    _sync_directory(final.parent)
    faces = sum(c["faces"] for c in collections.values())
    log.info(
        "wrote an index snapshot of %d faces in %d collections to %s in %.1f s",
        faces, len(collections), final, time.monotonic() - started,
    )  # fmt: skip
    return final


def take(database: Path) -> dict[str, FaceCache]:
    """The snapshot's caches if it matches the (closed) database as it is now, else
    none; the snapshot is deleted either way."""
    path = snapshot_path(database)
    if not path.exists():
        return {}
    started = time.monotonic()
    try:
        caches = _read(path, fingerprint(database))
    except (SnapshotMismatchError, OSError, ValueError, KeyError, TypeError) as error:
        log.warning("not using the index snapshot %s: %s; rebuilding from Milvus", path, error)
        caches = {}
    else:
        log.info(
            "read an index snapshot of %d faces in %d collections in %.1f s",
            sum(len(c) for c in caches.values()), len(caches), time.monotonic() - started,
        )  # fmt: skip
    finally:
        discard(database)
    return caches


def discard(database: Path) -> None:
    shutil.rmtree(snapshot_path(database), ignore_errors=True)


def _read(path: Path, database_fingerprint: str) -> dict[str, FaceCache]:
    manifest = json.loads((path / MANIFEST).read_text())
    if manifest.get("format") != FORMAT:
        raise SnapshotMismatchError(f"format {manifest.get('format')!r}, not {FORMAT}")
    if manifest["database_fingerprint"] != database_fingerprint:
        raise SnapshotMismatchError("the database changed after the snapshot was written")
    caches = {}
    for collection_id, entry in manifest["collections"].items():
        for name, digest in entry["files"].items():
            if _sha256(path / name) != digest:
                raise SnapshotMismatchError(f"{name} does not match its checksum")
        vectors = np.load(path / entry["vectors"], allow_pickle=False)
        rows = _rows(json.loads((path / entry["rows"]).read_bytes()))
        if vectors.shape != (entry["faces"], entry["dimension"]) or len(rows) != entry["faces"]:
            raise SnapshotMismatchError(f"collection {collection_id} is truncated")
        caches[collection_id] = FaceCache.of(entry["dimension"], rows, vectors)
    return caches


def _columns(rows: list[FaceRow]) -> dict[str, list[Any]]:
    return {name: [getattr(row, name) for row in rows] for name in _FIELDS}


def _rows(columns: dict[str, list[Any]]) -> list[FaceRow]:
    return [FaceRow(*values) for values in zip(*(columns[n] for n in _FIELDS), strict=True)]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as data:
        while chunk := data.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def _private_file(path: Path) -> Iterator[BinaryIO]:
    """A new file only the service's user can read, on disk when the block ends."""
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as out:
        yield out
        out.flush()
        os.fsync(out.fileno())


def _sync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
