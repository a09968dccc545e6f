"""The search service's logic on plain records: Milvus first, then the cache.

Writes to one collection are serialised by a lock, go to Milvus, and only once Milvus
has acknowledged them are applied to the in-memory cache (when there is one), so the
cache never holds what Milvus does not. Reads come from the cache when there is one,
else from Milvus. Milvus calls run in one worker thread: pymilvus is synchronous, and
Milvus Lite is not meant to be called from several threads at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from facegrid.config import SearchCache, StoreSettings, TlsSettings
from facegrid.errors import already_exists, failed_precondition, not_found
from facegrid.metrics import GALLERY_FACES
from facegrid.names import FaceName, SubjectName, collection_name
from facegrid.similarity import Calibration

from facegrid_search import snapshot
from facegrid_search.cache import FaceCache
from facegrid_search.convert import calibration_of
from facegrid_search.records import (
    CollectionSpec,
    FaceFilter,
    FaceRow,
    Match,
    SubjectRow,
    Vectors,
)
from facegrid_search.store import MilvusStore

log = logging.getLogger(__name__)
T = TypeVar("T")
# Milvus search returns at most this many hits; subject grouping on a server draws
# candidates from this many faces.
SERVER_GROUP_CANDIDATES = 16_384
# How often gallery sizes are counted for Prometheus when Milvus must be asked.
GAUGE_REFRESH_S = 30.0
# Rows of a snapshot compared with Milvus, field by field and vector by vector, at start.
SNAPSHOT_SAMPLE = 256


@dataclass
class Collection:
    spec: CollectionSpec
    cache: FaceCache | None
    lock: asyncio.Lock
    calibration: Calibration = field(init=False)

    def __post_init__(self) -> None:
        self.calibration = calibration_of(self.spec)


class SearchCore:
    def __init__(self, settings: StoreSettings, tls_settings: TlsSettings | None = None) -> None:
        self.settings = settings
        self._tls_settings = tls_settings or TlsSettings()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="milvus")
        self.store: MilvusStore | None = None
        self._collections: dict[str, Collection] = {}
        self._registry_lock = asyncio.Lock()
        self._gauge_task: asyncio.Task[None] | None = None
        # Collections with deletions not compacted yet (a Milvus server only).
        self._to_compact: set[str] = set()
        self._compaction_task: asyncio.Task[None] | None = None
        # Where the index is snapshot on shutdown: beside a Milvus Lite database only,
        # whose directory lock makes this process its one writer.
        self._snapshot_of: Path | None = None
        # A face write that raised (or was cancelled) may have reached Milvus without
        # reaching the index: then no snapshot is written.
        self._write_failed = False

    @property
    def cached(self) -> bool:
        return self._cached(self._store().is_lite)

    def _cached(self, is_lite: bool) -> bool:
        if self.settings.cache is SearchCache.AUTO:
            return is_lite
        return self.settings.cache is SearchCache.ON

    async def _milvus(self, call: Callable[..., T], *args: object) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, call, *args)

    async def open(self) -> None:
        """Connect to Milvus and, when caching, load every collection's cache: from the
        snapshot of the last clean stop where it still matches Milvus, else from Milvus."""
        is_lite = MilvusStore.is_lite_uri(self.settings.uri)
        saved: dict[str, FaceCache] = {}
        if is_lite and self._cached(is_lite):
            database = Path(self.settings.uri)
            if self.settings.index_snapshot:
                self._snapshot_of = database
                # Read (and consume) it before Milvus Lite opens and touches the directory.
                saved = await self._milvus(snapshot.take, database)
            else:  # one left from before would go stale (and keep erased faces): delete it
                await self._milvus(snapshot.discard, database)
        self.store = await self._milvus(
            MilvusStore, self.settings, not self._cached(is_lite), self._tls_settings
        )
        for spec in await self._milvus(self.store.list_specs):
            self._collections[spec.collection_id] = await self._load(
                spec, saved.pop(spec.collection_id, None)
            )
            self._observe(self._collections[spec.collection_id])
        if not self.cached:
            self._gauge_task = asyncio.create_task(self._refresh_gauges())
        if not self.store.is_lite and self.settings.compaction_delay_s > 0:
            self._compaction_task = asyncio.create_task(self._compact_after_deletes())

    async def _compact_after_deletes(self) -> None:
        """Deleted rows stay in a server's segments until a compaction rewrites them: each
        collection with deletions is compacted once per ``compaction_delay_s``."""
        while True:
            await asyncio.sleep(self.settings.compaction_delay_s)
            pending, self._to_compact = self._to_compact, set()
            for collection_id in sorted(pending):
                try:
                    await self._milvus(self._store().compact, collection_id)
                    log.info("compaction of %s started after deletions", collection_id)
                except Exception:  # dropped meanwhile, or Milvus away: next round
                    if collection_id in self._collections:
                        self._to_compact.add(collection_id)
                    log.warning("could not compact %s", collection_id, exc_info=True)

    def _observe(self, collection: Collection) -> None:
        """Gallery size for Prometheus: exact at once from the cache."""
        if collection.cache is not None:
            GALLERY_FACES.labels(collection.spec.collection_id).set(len(collection.cache))

    async def _refresh_gauges(self) -> None:
        """Without a cache, counting costs a Milvus query: done every half minute."""
        while True:
            try:
                for spec in await self.list_specs():
                    faces = await self._milvus(self._store().count_faces, spec.collection_id)
                    GALLERY_FACES.labels(spec.collection_id).set(faces)
            except Exception:  # Milvus away for a moment: the next round will tell
                log.warning("could not count the gallery sizes", exc_info=True)
            await asyncio.sleep(GAUGE_REFRESH_S)

    async def _write(self, call: Callable[..., T], *args: object) -> T:
        """A Milvus write the index will mirror once it is acknowledged."""
        try:
            return await self._milvus(call, *args)
        except BaseException:
            self._write_failed = True
            raise

    async def _load(self, spec: CollectionSpec, saved: FaceCache | None = None) -> Collection:
        await self._milvus(self._store().load, spec.collection_id)
        cache = None
        if saved is not None and await self._milvus(self._holds_exactly, spec, saved):
            cache = saved
            log.info("restored %d faces of %s from the snapshot", len(cache), spec.collection_id)
        elif self.cached:
            assert self.store is not None
            cache = FaceCache(spec.dimension)
            batches = await self._milvus(
                lambda: list(self.store.iterate_faces(spec.collection_id))  # type: ignore[union-attr]
            )
            for rows, vectors in batches:
                cache.upsert(rows, vectors)
            log.info("cached %d faces of %s", len(cache), spec.collection_id)
        return Collection(spec, cache, asyncio.Lock())

    def _holds_exactly(self, spec: CollectionSpec, saved: FaceCache) -> bool:
        """Whether Milvus holds what the snapshot does: as many faces, and a sample of
        them identical (the directory fingerprint already says nothing was written)."""
        store = self._store()
        faces = store.count_faces(spec.collection_id)
        rows, vectors = saved.contents()
        if faces != len(rows) or saved.dimension != spec.dimension:
            log.warning(
                "the snapshot of %s holds %d faces, Milvus %d: rebuilding it",
                spec.collection_id, len(rows), faces,
            )  # fmt: skip
            return False
        if not rows:
            return True
        positions = np.unique(np.linspace(0, len(rows) - 1, SNAPSHOT_SAMPLE).astype(int))
        found = store.get_faces(
            spec.collection_id, [rows[p].face_id for p in positions], with_vectors=True
        )
        for position in positions:
            row, vector = found.get(rows[position].face_id, (None, None))
            if (
                row != rows[position]
                or vector is None
                or not np.array_equal(vector, vectors[position])
            ):
                log.warning(
                    "face %s of %s differs between the snapshot and Milvus: rebuilding it",
                    rows[position].face_id, spec.collection_id,
                )  # fmt: skip
                return False
        return True

    async def close(self) -> None:
        for task in (self._gauge_task, self._compaction_task):
            if task is not None:
                task.cancel()
        if self.store is not None:
            await self._milvus(self.store.close)
        try:
            await self._milvus(self._write_snapshot)
        finally:
            self._executor.shutdown(wait=True)

    def _write_snapshot(self) -> None:
        caches = {
            c.spec.collection_id: c.cache for c in self._collections.values() if c.cache is not None
        }
        if self._snapshot_of is None or not caches or self.store is None:
            return
        if self._write_failed:
            log.warning("a Milvus write failed during this run: no index snapshot written")
            return
        try:
            snapshot.write(self._snapshot_of, caches)
        except OSError:
            log.exception("could not write the index snapshot; the next start rebuilds it")

    @property
    def index_type(self) -> str:
        """The Milvus index a new collection's faces get: "HNSW" or "FLAT"."""
        return self._store().index_type

    def _store(self) -> MilvusStore:
        assert self.store is not None
        return self.store

    # ---------------------------------------------------------------- collections

    async def collection(self, collection_id: str) -> Collection:
        if not self.cached:
            # A Milvus server may be shared by several replicas: its registry is the truth.
            spec = await self._milvus(self._store().get_spec, collection_id)
            if spec is None:
                self._collections.pop(collection_id, None)
            elif collection_id not in self._collections:
                self._collections[collection_id] = await self._load(spec)
            elif self._collections[collection_id].spec != spec:
                self._collections[collection_id].spec = spec  # updated by another replica
        found = self._collections.get(collection_id)
        if found is None:
            raise not_found("facegrid.v1.Collection", collection_name(collection_id))
        return found

    async def create_collection(self, spec: CollectionSpec) -> None:
        async with self._registry_lock:
            store = self._store()
            registered = await self._milvus(store.get_spec, spec.collection_id)
            if spec.collection_id in self._collections or registered is not None:
                raise already_exists("facegrid.v1.Collection", collection_name(spec.collection_id))
            await self._milvus(store.create_collection, spec)
            cache = FaceCache(spec.dimension) if self.cached else None
            self._collections[spec.collection_id] = Collection(spec, cache, asyncio.Lock())
            self._observe(self._collections[spec.collection_id])

    async def update_collection(self, collection_id: str, definition: dict[str, Any]) -> Collection:
        """Store a new definition of a collection (its display fields and minimum)."""
        async with self._registry_lock:
            collection = await self.collection(collection_id)
            spec = replace(collection.spec, definition=definition)
            await self._milvus(self._store().update_spec, spec)
            collection.spec = spec
            return collection

    async def list_specs(self) -> list[CollectionSpec]:
        if self.cached:
            return sorted(
                (c.spec for c in self._collections.values()), key=lambda s: s.collection_id
            )
        return await self._milvus(self._store().list_specs)

    async def counts(self, collection: Collection) -> tuple[int, int]:
        store = self._store()
        collection_id = collection.spec.collection_id
        faces = (
            len(collection.cache)
            if collection.cache is not None
            else await self._milvus(store.count_faces, collection_id)
        )
        subjects = await self._milvus(store.count_subjects, collection_id)
        return faces, subjects

    async def delete_collection(self, collection_id: str, force: bool) -> int:
        async with self._registry_lock:
            collection = await self.collection(collection_id)
            async with collection.lock:
                faces, subjects = await self.counts(collection)
                if (faces or subjects) and not force:
                    raise failed_precondition(
                        "NOT_EMPTY",
                        collection_name(collection_id),
                        f"{collection_name(collection_id)} holds {faces} faces and "
                        f"{subjects} subjects; delete them first or set force",
                    )
                await self._milvus(self._store().drop_collection, collection_id)
                self._collections.pop(collection_id, None)
                with contextlib.suppress(KeyError):
                    GALLERY_FACES.remove(collection_id)
                return faces

    # ---------------------------------------------------------------- faces

    async def face_rows(
        self, collection: Collection, face_ids: list[str], with_vectors: bool = False
    ) -> dict[str, tuple[FaceRow, Vectors | None]]:
        if collection.cache is not None:
            out: dict[str, tuple[FaceRow, Vectors | None]] = {}
            for face_id in face_ids:
                found = collection.cache.get(face_id)
                if found is not None:
                    out[face_id] = (found[0], found[1] if with_vectors else None)
            return out
        return await self._milvus(
            self._store().get_faces, collection.spec.collection_id, face_ids, with_vectors
        )

    async def upsert_faces(
        self, collection: Collection, rows: list[FaceRow], vectors: Vectors
    ) -> None:
        async with collection.lock:
            subjects = {row.subject_id for row in rows if row.subject_id}
            for subject_id in sorted(subjects):
                await self.subject(collection, subject_id)
            await self._write(
                self._store().upsert_faces, collection.spec.collection_id, rows, vectors
            )
            if collection.cache is not None:
                collection.cache.upsert(rows, vectors)
            self._observe(collection)

    async def delete_faces(self, collection: Collection, face_ids: list[str]) -> None:
        async with collection.lock:
            await self._delete_faces_locked(collection, face_ids)

    async def _delete_faces_locked(self, collection: Collection, face_ids: list[str]) -> None:
        if not face_ids:
            return
        await self._write(self._store().delete_faces, collection.spec.collection_id, face_ids)
        self._to_compact.add(collection.spec.collection_id)
        if collection.cache is not None:
            collection.cache.delete(face_ids)
        self._observe(collection)

    async def matching_ids(self, collection: Collection, face_filter: FaceFilter) -> list[str]:
        if collection.cache is not None:
            return sorted(collection.cache.matching_ids(face_filter))
        return await self._milvus(
            self._store().face_ids, collection.spec.collection_id, face_filter, ""
        )

    async def page(
        self, collection: Collection, face_filter: FaceFilter, after: str, limit: int
    ) -> tuple[list[FaceRow], bool]:
        if collection.cache is not None:
            return collection.cache.page(face_filter, after, limit)
        store = self._store()
        collection_id = collection.spec.collection_id
        ids = await self._milvus(store.face_ids, collection_id, face_filter, after)
        chosen = ids[:limit]
        found = await self._milvus(store.get_faces, collection_id, chosen, False)
        return [found[i][0] for i in chosen if i in found], len(ids) > limit

    async def search(
        self,
        collection: Collection,
        queries: Vectors,
        top_k: int,
        face_filter: FaceFilter,
        group_by_subject: bool,
        ef_search: int,
    ) -> list[list[Match]]:
        if collection.cache is not None:
            return collection.cache.search(queries, top_k, face_filter, group_by_subject)
        # Milvus itself searches; rows are fetched for the hits.
        store = self._store()
        collection_id = collection.spec.collection_id
        limit = top_k
        if group_by_subject:
            face_filter = face_filter.with_subject()
            limit = SERVER_GROUP_CANDIDATES
        hits = await self._milvus(
            store.search, collection_id, queries, limit, face_filter, ef_search
        )
        wanted = sorted({face_id for query in hits for face_id, _ in query})
        rows = await self._milvus(store.get_faces, collection_id, wanted, False)
        results = []
        for query in hits:
            matches = [
                Match(rows[face_id][0], score) for face_id, score in query if face_id in rows
            ]
            matches.sort(key=lambda m: (-m.cosine, m.row.face_id))
            if group_by_subject:
                seen: set[str] = set()
                grouped = []
                for match in matches:
                    if match.row.subject_id not in seen:
                        seen.add(match.row.subject_id)
                        grouped.append(match)
                matches = grouped
            results.append(matches[:top_k])
        return results

    # ---------------------------------------------------------------- subjects

    async def subject(self, collection: Collection, subject_id: str) -> SubjectRow:
        found = await self._milvus(
            self._store().get_subject, collection.spec.collection_id, subject_id
        )
        if found is None:
            name = SubjectName(collection.spec.collection_id, subject_id)
            raise not_found("facegrid.v1.Subject", str(name))
        return found

    async def subject_face_count(self, collection: Collection, subject_id: str) -> int:
        if collection.cache is not None:
            return collection.cache.count_by_subject(subject_id)
        return await self._milvus(
            self._store().count_faces,
            collection.spec.collection_id,
            FaceFilter(subject_ids=(subject_id,)),
        )

    async def create_subject(self, collection: Collection, subject: SubjectRow) -> None:
        async with collection.lock:
            existing = await self._milvus(
                self._store().get_subject, collection.spec.collection_id, subject.subject_id
            )
            if existing is not None:
                name = SubjectName(collection.spec.collection_id, subject.subject_id)
                raise already_exists("facegrid.v1.Subject", str(name))
            await self._milvus(self._store().upsert_subject, collection.spec.collection_id, subject)

    async def list_subjects(
        self, collection: Collection, after: str, limit: int
    ) -> list[SubjectRow]:
        return await self._milvus(
            self._store().list_subjects, collection.spec.collection_id, after, limit
        )

    async def delete_subject(self, collection: Collection, subject_id: str, force: bool) -> int:
        async with collection.lock:
            await self.subject(collection, subject_id)
            face_ids = await self.matching_ids(collection, FaceFilter(subject_ids=(subject_id,)))
            if face_ids and not force:
                name = SubjectName(collection.spec.collection_id, subject_id)
                raise failed_precondition(
                    "NOT_EMPTY",
                    str(name),
                    f"{name} has {len(face_ids)} faces; set force to delete them",
                )
            # Faces first: a crash in between leaves a subject without faces, never faces
            # of a deleted subject.
            await self._delete_faces_locked(collection, face_ids)
            await self._milvus(
                self._store().delete_subject, collection.spec.collection_id, subject_id
            )
            self._to_compact.add(collection.spec.collection_id)
            return len(face_ids)

    async def set_subject(
        self, collection: Collection, subject_id: str, faces: list[FaceName], associate: bool
    ) -> None:
        """Associate (or disassociate) faces with a subject, all or nothing."""
        async with collection.lock:
            await self.subject(collection, subject_id)
            face_ids = [f.face_id for f in faces]
            rows = await self.face_rows(collection, face_ids)
            for face in faces:
                if face.face_id not in rows:
                    raise not_found("facegrid.v1.Face", str(face))
            to_change = []
            for face in faces:
                current = rows[face.face_id][0].subject_id
                if current and current != subject_id:
                    raise failed_precondition(
                        "OTHER_SUBJECT",
                        str(face),
                        f"{face} belongs to subject {current!r}; disassociate it first",
                    )
                if associate and current != subject_id:
                    to_change.append(face.face_id)
                if not associate and current == subject_id:
                    to_change.append(face.face_id)
            target = subject_id if associate else ""
            await self._write(
                self._store().set_subject, collection.spec.collection_id, to_change, target
            )
            if collection.cache is not None:
                collection.cache.set_subject(to_change, target)
