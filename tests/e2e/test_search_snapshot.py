"""The search index's snapshot: a clean restart on Milvus Lite reads it instead of every
row, and it is used only when it matches what Milvus holds.

These run the search service's core in the test process on a real Milvus Lite database
(the service end to end is covered by test_search_service's restart tests).
"""

from __future__ import annotations

import asyncio
import json
import logging
import stat
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import pytest
from facegrid.config import StoreSettings
from facegrid.names import FaceName
from facegrid_search import snapshot
from facegrid_search.core import SearchCore
from facegrid_search.records import ALL_FACES, CollectionSpec, FaceFilter, FaceRow, SubjectRow
from facegrid_search.store import MilvusStore
from pymilvus import MilvusException

DIM = 16
FACES = 300
COLLECTION = "snap"
T = TypeVar("T")


def spec() -> CollectionSpec:
    calibration = {
        "modelVersion": "m",
        "points": [
            {"cosineSimilarity": 0.0, "similarity": 0.0},
            {"cosineSimilarity": 1.0, "similarity": 100.0},
        ],
    }
    return CollectionSpec(
        COLLECTION, DIM, "m", 1, {"dimension": DIM, "similarityCalibration": calibration}
    )


def unit(rows: int, seed: int) -> np.ndarray:
    data = np.random.default_rng(seed).normal(size=(rows, DIM)).astype(np.float32)
    return data / np.linalg.norm(data, axis=1, keepdims=True)


def run(database: Path, work: Callable[[SearchCore], Awaitable[T]], **settings: object) -> T:
    """Open a core on the database, do ``work``, close it (writing any snapshot)."""

    async def session() -> T:
        core = SearchCore(StoreSettings(uri=str(database), **settings))  # type: ignore[arg-type]
        await core.open()
        try:
            return await work(core)
        finally:
            await core.close()

    return asyncio.run(session())


async def fill(core: SearchCore) -> None:
    await core.create_collection(spec())
    collection = await core.collection(COLLECTION)
    await core.create_subject(collection, SubjectRow("alice", "Alice"))
    rows = [
        FaceRow(
            str(uuid.UUID(int=i + 1)),
            source_id=f"cam-{i % 4}",
            external_image_id=f"img-{i}",
            create_time_us=1_000 + i,
            attrs={"metadata": {"index": i}, "confidence": 0.5 + i / 1000},
        )
        for i in range(FACES)
    ]
    await core.upsert_faces(collection, rows, unit(FACES, seed=1))
    await core.delete_faces(collection, [rows[7].face_id, rows[8].face_id])
    await core.set_subject(
        collection, "alice", [FaceName(COLLECTION, rows[0].face_id)], associate=True
    )


async def contents(core: SearchCore) -> tuple[list[FaceRow], list[list[str]], int]:
    """Every face (by id), the top 5 of a few queries with and without a filter, the count."""
    collection = await core.collection(COLLECTION)
    rows, _ = await core.page(collection, ALL_FACES, "", 10_000)
    queries = unit(3, seed=2)
    found = []
    for face_filter in (ALL_FACES, FaceFilter(source_ids=("cam-1",))):
        for matches in await core.search(collection, queries, 5, face_filter, False, 64):
            found.append([m.row.face_id for m in matches])
    faces, _ = await core.counts(collection)
    return rows, found, faces


def test_a_clean_restart_reads_the_snapshot_and_answers_the_same(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    database = tmp_path / "facegrid.db"
    before = run(database, lambda core: _fill_then(core, contents))
    written = snapshot.snapshot_path(database)
    assert (written / snapshot.MANIFEST).is_file()
    for path in written.iterdir():  # embeddings: private to the service's user
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(written.stat().st_mode) == 0o700

    with caplog.at_level(logging.INFO, logger="facegrid_search"):
        after = run(database, contents)
    assert f"restored {FACES - 2} faces of {COLLECTION} from the snapshot" in caplog.text
    assert after == before
    # The same again from a full rebuild; with the setting off, a snapshot is deleted.
    rebuilt = run(database, contents, index_snapshot=False)
    assert rebuilt == before
    assert not written.exists()


def test_a_snapshot_is_consumed_at_start(tmp_path: Path) -> None:
    database = tmp_path / "facegrid.db"
    run(database, fill)
    written = snapshot.snapshot_path(database)

    async def look(core: SearchCore) -> bool:
        return written.exists()

    assert run(database, look) is False


def test_a_database_written_while_stopped_is_rebuilt(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    database = tmp_path / "facegrid.db"
    run(database, fill)
    # Another process deletes a face while the service is down (a restore, a tool).
    store = MilvusStore(StoreSettings(uri=str(database)))
    gone = str(uuid.UUID(int=1))
    store.delete_faces(COLLECTION, [gone])
    store.close()

    with caplog.at_level(logging.WARNING, logger="facegrid_search"):
        rows, _, faces = run(database, contents)
    assert "the database changed after the snapshot was written" in caplog.text
    assert gone not in {row.face_id for row in rows}
    assert faces == FACES - 3


def test_a_snapshot_that_differs_from_milvus_is_not_used(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Even with the right fingerprint and checksums, a sample is compared with Milvus."""
    database = tmp_path / "facegrid.db"
    run(database, fill)
    written = snapshot.snapshot_path(database)
    manifest = json.loads((written / snapshot.MANIFEST).read_text())
    entry = manifest["collections"][COLLECTION]
    vectors = np.load(written / entry["vectors"])
    vectors[0] = -vectors[0]
    (written / entry["vectors"]).unlink()
    with (written / entry["vectors"]).open("wb") as out:
        np.save(out, vectors)
    entry["files"][entry["vectors"]] = snapshot._sha256(written / entry["vectors"])
    (written / snapshot.MANIFEST).write_text(json.dumps(manifest))

    with caplog.at_level(logging.WARNING, logger="facegrid_search"):
        used = run(database, contents)
    assert "differs between the snapshot and Milvus: rebuilding it" in caplog.text
    assert run(database, contents, index_snapshot=False) == used


def test_a_corrupt_snapshot_is_ignored(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    database = tmp_path / "facegrid.db"
    before = run(database, lambda core: _fill_then(core, contents))
    written = snapshot.snapshot_path(database)
    entry = json.loads((written / snapshot.MANIFEST).read_text())["collections"][COLLECTION]
    rows_file = written / entry["rows"]
    data = bytearray(rows_file.read_bytes())
    data[len(data) // 2] ^= 0x01
    rows_file.write_bytes(bytes(data))

    with caplog.at_level(logging.WARNING, logger="facegrid_search"):
        after = run(database, contents)
    assert "does not match its checksum" in caplog.text
    assert after == before


def test_no_snapshot_after_a_write_that_failed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    database = tmp_path / "facegrid.db"

    async def fail_a_write(core: SearchCore) -> None:
        await fill(core)
        collection = await core.collection(COLLECTION)
        with pytest.raises(MilvusException, match="dim"):
            await core.upsert_faces(collection, [FaceRow("bad")], np.ones((1, DIM + 1), "f4"))

    with caplog.at_level(logging.WARNING, logger="facegrid_search"):
        run(database, fail_a_write)
    assert "a Milvus write failed during this run: no index snapshot written" in caplog.text
    assert not snapshot.snapshot_path(database).exists()


async def _fill_then(core: SearchCore, then: Callable[[SearchCore], Awaitable[T]]) -> T:
    await fill(core)
    return await then(core)
