"""Milvus facts: what the SearchService's MilvusClient calls do on Milvus Lite and on a server.

Run by hand (not part of the test suite), with the project venv (pymilvus 3.0.2,
milvus-lite 3.2.2) and the server's own venv (`pip install --no-deps -r
requirements/milvus.txt` into .venv-milvus):

    .venv/bin/python loadtest/milvus_facts.py [--milvus-venv .venv-milvus] [--only lite]

It runs one scenario against Milvus Lite (a temporary ``x.db``) and against a real
Milvus 2.3.5 standalone server (services/facegrid_harness/milvus_server.py, temporary base dir):
the collection schema and index from configuration (FLAT and HNSW, IP on unit vectors),
load, insert vs upsert, deletes by ids and by filter, query (filters, output fields,
limit/offset pages, query_iterator, count(*)), get, filtered search checked against an
exact numpy answer, consistency levels (do a client's own writes and deletes show at
once?), flush, describe/list/drop, and what a restart and a crash (SIGKILL) keep.

Prints one row per fact with the observation on each backend, ``!=`` where they differ,
then the timings. The last line is one JSON object with every observation and timing.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pymilvus import DataType, MilvusClient, MilvusException

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "services"))

from facegrid_harness.milvus_server import MilvusServer  # noqa: E402

DIM = 128
SECOND_US = 1_000_000
T0_US = 1_700_000_000 * SECOND_US  # create_time of row 0; row i is i seconds later
SUBJECTS = 50
SOURCES = 10
FLAT = "faces_flat"
HNSW = "faces_hnsw"
# As the SearchService will read them from its configuration.
INDEX_CONFIGS: dict[str, dict[str, Any]] = {
    FLAT: {"index_type": "FLAT", "metric_type": "IP", "params": {}},
    HNSW: {"index_type": "HNSW", "metric_type": "IP", "params": {"M": 16, "efConstruction": 200}},
}
SEARCH_PARAMS: dict[str, dict[str, Any]] = {
    FLAT: {"metric_type": "IP", "params": {}},
    HNSW: {"metric_type": "IP", "params": {"ef": 64}},
}
Row = dict[str, Any]


# --- data ---------------------------------------------------------------------------
@dataclass
class Data:
    """Rows with unit vectors, and the exact (numpy) answer to any filtered search."""

    n: int
    vectors: NDArray[np.float32] = field(init=False)

    def __post_init__(self) -> None:
        v = np.random.default_rng(0).standard_normal((self.n + 400, DIM)).astype(np.float32)
        self.vectors = v / np.linalg.norm(v, axis=1, keepdims=True)

    @staticmethod
    def face_id(i: int) -> str:
        return f"face-{i:06d}"

    @staticmethod
    def subject(i: int) -> str:
        return f"subj-{i % SUBJECTS:02d}"

    @staticmethod
    def source(i: int) -> str:
        return f"cam-{(i // 7) % SOURCES}"  # not aligned with the subjects

    def row(self, i: int, **changes: Any) -> Row:
        row: Row = {
            "face_id": self.face_id(i),
            "subject_id": self.subject(i),
            "source_id": self.source(i),
            "external_image_id": f"img-{i // 2:06d}.jpg",
            "create_time": T0_US + i * SECOND_US,
            "metadata": {"camera": self.source(i), "quality": round((i % 97) / 97, 3)},
            "embedding": self.vectors[i].tolist(),
        }
        row.update(changes)
        return row

    def rows(self, indices: range) -> list[Row]:
        return [self.row(i) for i in indices]

    def exact(self, query: int, allowed: list[int], k: int) -> list[str]:
        scores = self.vectors[allowed] @ self.vectors[query]
        return [self.face_id(allowed[j]) for j in np.argsort(-scores, kind="stable")[:k]]


def schema() -> Any:
    s = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    s.add_field("face_id", DataType.VARCHAR, max_length=64, is_primary=True)
    s.add_field("subject_id", DataType.VARCHAR, max_length=64)
    s.add_field("source_id", DataType.VARCHAR, max_length=128)
    s.add_field("external_image_id", DataType.VARCHAR, max_length=256)
    s.add_field("create_time", DataType.INT64)  # µs since the epoch
    s.add_field("metadata", DataType.JSON)
    s.add_field("embedding", DataType.FLOAT_VECTOR, dim=DIM)
    return s


def index_params(config: dict[str, Any]) -> Any:
    params = MilvusClient.prepare_index_params()
    params.add_index(field_name="embedding", **config)
    return params


# --- backends -----------------------------------------------------------------------
class Backend:
    name = ""

    def client(self, dedicated: bool = False) -> MilvusClient:
        """``dedicated``: a connection of its own, as another worker would have."""
        raise NotImplementedError

    def restart(self) -> None:
        raise NotImplementedError

    def crash_after(self, writes: dict[str, Any]) -> None:
        """Apply ``writes`` (see apply_writes), die without any shutdown, come back."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class LiteBackend(Backend):
    name = "lite"

    def __init__(self, work: Path) -> None:
        work.mkdir(parents=True, exist_ok=True)
        self.path = work / "facts.db"

    def client(self, dedicated: bool = False) -> MilvusClient:
        return MilvusClient(str(self.path), dedicated=dedicated)

    def release(self) -> None:
        # MilvusClient.close() leaves the in-process Lite server, its lock and its unsynced
        # WAL open until the process exits; only the server manager closes the database.
        from milvus_lite.server_manager import server_manager_instance

        server_manager_instance.release_server(str(self.path))

    def restart(self) -> None:
        self.release()

    def crash_after(self, writes: dict[str, Any]) -> None:
        self.release()  # the database directory is locked by one process
        spec = self.path.parent / "crash.json"
        spec.write_text(json.dumps(writes))
        child = subprocess.run(
            [sys.executable, __file__, "--lite-crash-child", str(self.path), str(spec)],
            capture_output=True,
            text=True,
            check=False,
            timeout=300,
        )
        if child.returncode != -signal.SIGKILL:
            raise RuntimeError(f"crash child ended with {child.returncode}: {child.stderr[-2000:]}")

    def close(self) -> None:
        self.release()


class ServerBackend(Backend):
    name = "server"

    def __init__(self, venv: Path, work: Path, timings: dict[str, float]) -> None:
        self.server = MilvusServer(venv, work / "milvus")
        self.timings = timings
        self.clients: list[MilvusClient] = []
        start = time.monotonic()
        self.server.start()
        timings["server: first start, fresh base dir (unpacks ~250 MB), s"] = (
            time.monotonic() - start
        )

    def client(self, dedicated: bool = False) -> MilvusClient:
        client = MilvusClient(self.server.uri, dedicated=dedicated)
        self.clients.append(client)
        return client

    def restart(self) -> None:
        start = time.monotonic()
        self.server.stop()
        self.timings["server: stop (SIGTERM), s"] = time.monotonic() - start
        start = time.monotonic()
        self.server.start()
        self.timings["server: start on the same base dir, s"] = time.monotonic() - start

    def crash_after(self, writes: dict[str, Any]) -> None:
        apply_writes(self.client(), writes)
        self.server.kill()
        start = time.monotonic()
        self.server.start()
        self.timings["server: start after SIGKILL, s"] = time.monotonic() - start

    def close(self) -> None:
        for client in self.clients:
            with suppress(Exception):
                client.close()
        self.server.stop()


def apply_writes(client: MilvusClient, writes: dict[str, Any]) -> None:
    name = writes["collection"]
    client.insert(name, writes["insert"])
    client.upsert(name, writes["upsert"])
    client.delete(name, ids=writes["delete_ids"])
    client.delete(name, filter=writes["delete_filter"])


def lite_crash_child(path: str, spec: str) -> None:
    apply_writes(MilvusClient(path), json.loads(Path(spec).read_text()))
    os.kill(os.getpid(), signal.SIGKILL)  # no close: Lite fsyncs its WAL only on close


# --- recording ----------------------------------------------------------------------
@dataclass
class Facts:
    order: list[str] = field(default_factory=list)
    seen: dict[str, dict[str, str]] = field(default_factory=dict)

    def put(self, key: str, backend: str, value: object) -> None:
        if key not in self.seen:
            self.order.append(key)
            self.seen[key] = {}
        self.seen[key][backend] = _fmt(value)

    def table(self, backends: list[str]) -> str:
        width = max(len(k) for k in self.order)
        lines = [f"   {'fact'.ljust(width)}  " + " | ".join(backends)]
        for key in self.order:
            values = [self.seen[key].get(b, "-") for b in backends]
            mark = "  " if len(set(values)) == 1 else "!="
            lines.append(f"{mark} {key.ljust(width)}  " + " | ".join(values))
        return "\n".join(lines)


def _fmt(value: object) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}={_fmt(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        if len(value) > 6:  # e.g. the primary keys that Lite's delete() returns
            return f"[{len(value)} items: {_fmt(value[0])}, ...]"
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


def _error(exc: BaseException) -> str:
    text = f"({exc.code}) {exc.message}" if isinstance(exc, MilvusException) else repr(exc)
    return "ERROR " + " ".join(text.split())[:100]


# --- the scenario -------------------------------------------------------------------
class Probe:
    """One backend: runs the calls, records what they did, tracks faces_flat's rows."""

    def __init__(self, backend: Backend, facts: Facts, data: Data, timings: dict[str, float]):
        self.b = backend
        self.facts = facts
        self.data = data
        self.timings = timings
        self.alive = set(range(data.n))  # row indices that faces_flat should hold
        start = time.monotonic()
        self.c = backend.client()
        timings[f"{backend.name}: first client (opens the store), s"] = time.monotonic() - start

    # -- helpers
    def check(self, key: str, run: Callable[[], object]) -> Any:
        try:
            value = run()
        except Exception as exc:
            self.facts.put(key, self.b.name, _error(exc))
            return None
        self.facts.put(key, self.b.name, "ok" if value is None else value)
        return value

    def put(self, key: str, value: object) -> None:
        self.facts.put(key, self.b.name, value)

    def count(self, flt: str = "", level: str = "Strong", coll: str = FLAT) -> int:
        rows = self.c.query(coll, filter=flt, output_fields=["count(*)"], consistency_level=level)
        return int(rows[0]["count(*)"])

    def face_ids(self, flt: str, **kwargs: Any) -> list[str]:
        rows = self.c.query(FLAT, filter=flt, output_fields=["face_id"], **kwargs)
        return [r["face_id"] for r in rows]

    def search(self, i: int, coll: str = FLAT, **kwargs: Any) -> list[Any]:
        kwargs.setdefault("limit", 10)
        return list(self.c.search(coll, [self.data.vectors[i].tolist()], **kwargs)[0])

    def top(self, i: int, **kwargs: Any) -> str | None:
        hits = self.search(i, limit=1, **kwargs)
        return hit_id(hits[0]) if hits else None

    def time_ms(self, key: str, run: Callable[[], object], repeat: int = 5) -> None:
        start = time.monotonic()
        for _ in range(repeat):
            run()
        self.timings[f"{self.b.name}: {key}, ms"] = (time.monotonic() - start) / repeat * 1000

    def run(self) -> None:
        for section in (
            self.collections,
            self.writes,
            self.reads,
            self.searches,
            self.consistency,
            self.deletes,
            self.restarts,
            self.drops,
        ):
            try:
                section()
            except Exception as exc:  # record it and go on with the next section
                self.put(f"section {section.__name__} stopped", _error(exc))

    # -- sections
    def collections(self) -> None:
        c = self.c
        self.check("list_collections on a new store", lambda: sorted(c.list_collections()))
        for coll, config in INDEX_CONFIGS.items():
            self.check(
                f"create_collection(schema, index_params {config['index_type']})",
                lambda coll=coll, config=config: c.create_collection(
                    coll, schema=schema(), index_params=index_params(config)
                ),
            )
        flat = index_params(INDEX_CONFIGS[FLAT])
        self.check(
            "create_collection again, same name and schema",
            lambda: c.create_collection(FLAT, schema=schema(), index_params=flat),
        )
        bogus = index_params({"index_type": "NO_SUCH", "metric_type": "IP", "params": {}})
        self.check(
            "create_collection, unknown index_type",
            lambda: c.create_collection("bogus", schema=schema(), index_params=bogus),
        )
        with suppress(Exception):
            c.drop_collection("bogus")
        self.check(
            "get_load_state right after create", lambda: str(c.get_load_state(FLAT)["state"])
        )
        self.check("load_collection when loaded", lambda: c.load_collection(FLAT))
        self.check("list_collections", lambda: sorted(c.list_collections()))
        self.check("has_collection(missing)", lambda: c.has_collection("nope"))
        self.check("describe_collection: fields", lambda: _fields(c.describe_collection(FLAT)))
        self.check(
            "describe_collection: other keys",
            lambda: {
                k: v
                for k, v in c.describe_collection(FLAT).items()
                if k in ("auto_id", "enable_dynamic_field", "consistency_level", "num_shards")
            },
        )
        for coll in INDEX_CONFIGS:
            self.check(
                f"describe_index({coll})",
                lambda coll=coll: {
                    k: v
                    for k, v in c.describe_index(coll, c.list_indexes(coll)[0]).items()
                    if k in ("index_type", "metric_type", "M", "efConstruction", "params")
                },
            )

    def writes(self) -> None:
        c, d, n = self.c, self.data, self.data.n
        start = time.monotonic()
        for coll in INDEX_CONFIGS:
            for s in range(0, n, 500):
                result = c.insert(coll, d.rows(range(s, min(s + 500, n))))
        self.timings[f"{self.b.name}: insert {n} rows into 2 collections, s"] = (
            time.monotonic() - start
        )
        self.put(
            "insert() result keys, ids type", [sorted(result), type(result["ids"][0]).__name__]
        )
        self.check("count(*) right after insert, Strong", lambda: self.count())
        self.check("count(*) right after insert, Bounded", lambda: self.count(level="Bounded"))

        dup = d.row(1, subject_id="subj-dup")
        self.check("insert a duplicate primary key", lambda: c.insert(FLAT, [dup])["insert_count"])
        self.check("  then count(*)", lambda: self.count() - n)
        self.check(
            "  then get(id): subject_ids",
            lambda: sorted(r["subject_id"] for r in c.get(FLAT, ids=[dup["face_id"]])),
        )
        self.check(
            "  then query(face_id ==): rows",
            lambda: len(
                self.face_ids(f'face_id == "{dup["face_id"]}"', consistency_level="Strong")
            ),
        )
        self.check(
            "  then search its vector: hits with that id",
            lambda: [hit_id(h) for h in self.search(1, limit=3)].count(dup["face_id"]),
        )
        c.delete(FLAT, ids=[dup["face_id"]])  # every copy
        c.insert(FLAT, [d.row(1)])
        self.check("  delete(id) + insert: count(*)", lambda: self.count() - n)

        self.check("upsert an existing pk", lambda: c.upsert(FLAT, [d.row(2, subject_id="up")]))
        self.check(
            "  then count(*), get subject",
            lambda: [self.count() - n, c.get(FLAT, ids=[d.face_id(2)])[0]["subject_id"]],
        )
        c.upsert(FLAT, [d.row(2)])
        self.check(
            "upsert a new pk: count(*)", lambda: c.upsert(FLAT, [d.row(n)]) or self.count() - n
        )
        c.delete(FLAT, ids=[d.face_id(n)])
        bad = {
            "insert face_id of 65 chars (max 64)": d.row(n + 1, face_id="f" * 65),
            "insert subject_id of 65 chars (max 64)": d.row(n + 2, subject_id="s" * 65),
            "insert without the metadata field": {
                k: v for k, v in d.row(n + 3).items() if k != "metadata"
            },
            "insert metadata=None": d.row(n + 4, metadata=None),
            "insert a 127-d vector": d.row(n + 5, embedding=[0.1] * (DIM - 1)),
            "insert an unknown extra field": d.row(n + 6, extra=1),
        }
        for key, row in bad.items():
            self.check(key, lambda row=row: c.insert(FLAT, [row]) and "accepted")
        for i in range(n + 1, n + 7):
            c.delete(FLAT, ids=[d.face_id(i), "f" * 65])
        self.check("  count(*) after those", lambda: self.count() - n)

    def reads(self) -> None:
        c, d, n = self.c, self.data, self.data.n
        self.check(
            "get([b, a, missing]): ids in order",
            lambda: [r["face_id"] for r in c.get(FLAT, ids=[d.face_id(9), d.face_id(3), "nope"])],
        )
        self.check(
            "get(): default output fields", lambda: sorted(c.get(FLAT, ids=[d.face_id(3)])[0])
        )
        self.check(
            "get(output_fields=[subject_id]): keys",
            lambda: sorted(c.get(FLAT, ids=[d.face_id(3)], output_fields=["subject_id"])[0]),
        )
        self.check(
            "metadata JSON round trip",
            lambda: c.get(FLAT, ids=[d.face_id(3)])[0]["metadata"] == d.row(3)["metadata"],
        )
        self.check("query(filter='') without limit", lambda: len(self.face_ids("")))
        self.check("query(filter='', limit=10)", lambda: len(self.face_ids("", limit=10)))
        cam1 = sorted(d.face_id(i) for i in range(n) if d.source(i) == "cam-1")

        def pages(size: int) -> str:
            got: list[str] = []
            for offset in range(0, len(cam1) + size, size):
                got += self.face_ids('source_id == "cam-1"', limit=size, offset=offset)
            return _list_report(got, cam1)

        self.check("query limit/offset pages of 50, source filter", lambda: pages(50))
        self.check(
            "query(limit=10, offset=16380)",
            lambda: len(self.face_ids('source_id != ""', limit=10, offset=16380)),
        )
        self.check("query(limit=16385)", lambda: len(self.face_ids('source_id != ""', limit=16385)))

        def iterate(flt: str, batch: int) -> str:
            it = c.query_iterator(FLAT, batch_size=batch, filter=flt, output_fields=["face_id"])
            got: list[str] = []
            try:
                while page := it.next():
                    got += [r["face_id"] for r in page]
            finally:
                it.close()
            want = [d.face_id(i) for i in range(n) if not flt or d.source(i) == "cam-1"]
            return _list_report(got, want)

        self.check(
            "query_iterator(batch 100, source filter)", lambda: iterate('source_id == "cam-1"', 100)
        )
        self.check("query_iterator(batch 500, no filter)", lambda: iterate("", 500))
        some = [d.face_id(i) for i in (7, 5, 6)] + ["nope"]
        self.check(
            "query(face_id in [...]), one missing: order",
            lambda: self.face_ids(f"face_id in {json.dumps(some)}"),
        )
        lo, hi = T0_US + 100 * SECOND_US, T0_US + 150 * SECOND_US
        filters = {
            "count(create_time in [100 s, 150 s))": f"create_time >= {lo} and create_time < {hi}",
            "count(metadata['camera'] == 'cam-1')": 'metadata["camera"] == "cam-1"',
            "count(subject_id like 'subj-0%')": 'subject_id like "subj-0%"',
            "count(subject_id in [2 subjects])": 'subject_id in ["subj-01", "subj-02"]',
            "count(subject_id == 'subj-03')": 'subject_id == "subj-03"',
        }
        for key, flt in filters.items():
            self.check(key, lambda flt=flt: self.count(flt))
        self.check(
            "count with filter_params template {s}",
            lambda: c.query(
                FLAT,
                filter="subject_id == {s}",
                filter_params={"s": "subj-03"},
                output_fields=["count(*)"],
            )[0]["count(*)"],
        )
        weird = "a\"b\\c'd"
        c.insert(FLAT, [d.row(n + 7, subject_id=weird)])
        escaped = weird.replace("\\", "\\\\").replace('"', '\\"')
        self.check(
            "filter on a subject with \" \\ ' (escaped)",
            lambda: self.count(f'subject_id == "{escaped}"'),
        )
        c.delete(FLAT, ids=[d.face_id(n + 7)])

    def searches(self) -> None:
        c, d, n = self.c, self.data, self.data.n
        queries = list(range(0, 400, 20))
        window = range(500, 500 + n // 20)
        cases: dict[str, tuple[Callable[[int], bool], str]] = {
            "no filter": (lambda i: True, ""),
            "subject (2%)": (lambda i: d.subject(i) == "subj-07", 'subject_id == "subj-07"'),
            "source (10%)": (lambda i: d.source(i) == "cam-3", 'source_id == "cam-3"'),
            "create_time range (5%)": (
                lambda i: i in window,
                f"create_time >= {T0_US + window.start * SECOND_US}"
                f" and create_time < {T0_US + window.stop * SECOND_US}",
            ),
            "JSON camera (10%)": (
                lambda i: d.source(i) == "cam-5",
                'metadata["camera"] == "cam-5"',
            ),
        }

        def recall(coll: str, mask: Callable[[int], bool], flt: str, k: int = 10) -> str:
            allowed = [i for i in sorted(self.alive) if mask(i)]
            hits = c.search(
                coll,
                d.vectors[queries].tolist(),
                filter=flt,
                limit=k,
                search_params=SEARCH_PARAMS[coll],
                consistency_level="Strong",
            )
            found = sum(
                len({hit_id(h) for h in res} & set(d.exact(q, allowed, k)))
                for q, res in zip(queries, hits, strict=True)
            )
            return f"{found / (len(queries) * min(k, len(allowed))):.2f}"

        for coll in INDEX_CONFIGS:
            kind = INDEX_CONFIGS[coll]["index_type"]
            for label, (mask, flt) in cases.items():
                self.check(
                    f"search recall@10 {kind}, {label}",
                    lambda coll=coll, mask=mask, flt=flt: recall(coll, mask, flt),
                )

        def hit_shape() -> str:
            hits = self.search(4, limit=5, output_fields=["subject_id", "create_time"])
            dots = [float(d.vectors[4] @ d.vectors[int(hit_id(h)[5:])]) for h in hits]
            err = max(abs(h["distance"] - dot) for h, dot in zip(hits, dots, strict=True))
            ordered = all(a["distance"] >= b["distance"] for a, b in pairwise(hits))
            return (
                f"keys={sorted(hits[0])} entity={sorted(hits[0]['entity'])} "
                f"top1_is_self={hit_id(hits[0]) == d.face_id(4)} max|dist-dot|={err:.0e} "
                f"descending={ordered}"
            )

        self.check("search hit shape; distance == dot product", hit_shape)
        self.check(
            "hit['face_id'] with output_fields=['face_id']",
            lambda: self.search(4, output_fields=["face_id"])[0]["face_id"] == d.face_id(4),
        )
        self.check("Hit.id property", lambda: self.search(4)[0].id)
        self.check(
            "search limit=100, 40 rows match",
            lambda: len(self.search(0, filter='subject_id == "subj-00"', limit=100)),
        )
        self.check(
            "search offset=5, limit=5 == ranks 5-9",
            lambda: (
                [hit_id(h) for h in self.search(0, limit=5, offset=5)]
                == [hit_id(h) for h in self.search(0, limit=10)][5:]
            ),
        )
        self.check(
            "search with metric L2 on the IP index",
            lambda: len(self.search(0, search_params={"metric_type": "L2", "params": {}})),
        )
        self.check("search without search_params", lambda: self.top(0) == d.face_id(0))
        self.check(
            "search nq=4: hits per query",
            lambda: [len(r) for r in c.search(FLAT, d.vectors[:4].tolist(), limit=3)],
        )
        self.time_ms("search top-10, FLAT", lambda: self.search(8))
        self.time_ms("search top-10, HNSW", lambda: self.search(8, HNSW))
        self.check("release_collection", lambda: c.release_collection(HNSW))
        self.check("  then search it", lambda: len(self.search(0, HNSW)))
        self.check("  then query it", lambda: len(c.query(HNSW, filter='subject_id == "subj-00"')))
        self.check("  then get_load_state", lambda: str(c.get_load_state(HNSW)["state"]))
        c.load_collection(HNSW)

    def consistency(self) -> None:
        """Does a client see its own insert or delete in the very next call?"""
        c, d, n = self.c, self.data, self.data.n
        other = self.b.client(dedicated=True)  # a second connection in this process
        fresh = iter(range(n + 20, n + 300))
        victims = iter(range(1000, 1100))
        for level in (None, "Bounded", "Session", "Strong"):
            label = level or "collection default"
            kw: dict[str, Any] = {"consistency_level": level} if level else {}
            shown = [0, 0, 0]
            gone = [0, 0]
            for _ in range(3):
                i = next(fresh)
                c.insert(FLAT, [d.row(i)])
                shown[0] += len(self.face_ids(f'face_id == "{d.face_id(i)}"', **kw))
                i = next(fresh)
                c.insert(FLAT, [d.row(i)])
                shown[1] += self.top(i, **kw) == d.face_id(i)
                i = next(fresh)
                c.insert(FLAT, [d.row(i)])
                rows = other.query(FLAT, filter=f'face_id == "{d.face_id(i)}"', **kw)
                shown[2] += len(rows)
                v = next(victims)
                c.delete(FLAT, ids=[d.face_id(v)])
                self.alive.discard(v)
                gone[0] += not self.face_ids(f'face_id == "{d.face_id(v)}"', **kw)
                v = next(victims)
                c.delete(FLAT, ids=[d.face_id(v)])
                self.alive.discard(v)
                gone[1] += self.top(v, **kw) != d.face_id(v)
            self.put(f"own insert shown: query, search; {label}", f"{shown[0]}/3, {shown[1]}/3")
            # pymilvus keeps Session timestamps per process, so this is not another worker.
            self.put(f"insert shown to a 2nd client, same process; {label}", f"{shown[2]}/3")
            self.put(f"own delete gone: query, search; {label}", f"{gone[0]}/3, {gone[1]}/3")
            self.time_ms(
                f"query by id, {label}",
                lambda kw=kw: self.face_ids('face_id == "face-000003"', **kw),
            )
        c.delete(FLAT, ids=[d.face_id(i) for i in range(n + 20, n + 300)])
        with suppress(Exception):
            other.close()
        self.check(
            "count(*) now, Bounded vs Strong (expected 0)",
            lambda: [self.count(level="Bounded") - len(self.alive), self.count() - len(self.alive)],
        )

    def deletes(self) -> None:
        c, d = self.c, self.data
        self.check(
            "delete(ids=[2 rows]): result",
            lambda: c.delete(FLAT, ids=[d.face_id(1100), d.face_id(1101)]),
        )
        self.check("delete(ids=[missing]): result", lambda: c.delete(FLAT, ids=["nope"]))
        self.check(
            "delete(filter=subject_id == X): result",
            lambda: c.delete(FLAT, filter='subject_id == "subj-11"'),
        )
        self.check("  then count(subject_id == X)", lambda: self.count('subject_id == "subj-11"'))
        ids = [d.face_id(i) for i in (1200, 1201, 1202)]
        self.check(
            "delete(filter=face_id in [...]): result",
            lambda: c.delete(FLAT, filter=f"face_id in {json.dumps(ids)}"),
        )
        self.check(
            "delete(filter=create_time < X): result",
            lambda: c.delete(FLAT, filter=f"create_time < {T0_US + 20 * SECOND_US}"),
        )
        self.check("delete(filter='')", lambda: c.delete(FLAT, filter=""))
        self.alive -= {1100, 1101, 1200, 1201, 1202} | set(range(20))
        self.alive -= {i for i in self.alive if d.subject(i) == "subj-11"}
        self.check("count(*) after deletes (expected 0)", lambda: self.count() - len(self.alive))
        start = time.monotonic()
        self.check("flush", lambda: c.flush(FLAT))
        self.timings[f"{self.b.name}: flush, s"] = time.monotonic() - start

    def _writes(self, first: int, upsert: int, deleted: range, subject: str) -> dict[str, Any]:
        d = self.data
        # The filter delete runs after the insert, so it also takes the new rows' matches.
        self.alive |= set(range(first, first + 20))
        self.alive -= set(deleted) | {i for i in self.alive if d.subject(i) == subject}
        return {
            "collection": FLAT,
            "insert": d.rows(range(first, first + 20)),
            "upsert": [d.row(upsert, subject_id=f"up-{upsert}")],
            "delete_ids": [d.face_id(i) for i in deleted],
            "delete_filter": f'subject_id == "{subject}"',
        }

    def _after(self, when: str, upsert: int) -> None:
        c = self.c
        self.check(f"{when}: get_load_state", lambda: str(c.get_load_state(FLAT)["state"]))
        self.check(f"{when}: search before load_collection", lambda: len(self.search(50)))
        self.check(f"{when}: load_collection", lambda: c.load_collection(FLAT))
        self.check(f"{when}: count(*) (expected 0)", lambda: self.count() - len(self.alive))
        self.check(
            f"{when}: upsert kept",
            lambda: c.get(FLAT, ids=[self.data.face_id(upsert)])[0]["subject_id"] == f"up-{upsert}",
        )
        self.check(f"{when}: search", lambda: self.top(50) == self.data.face_id(50))

    def restarts(self) -> None:
        """Un-flushed inserts, an upsert, deletes by id and by filter; then restart, crash."""
        n = self.data.n
        apply_writes(self.c, self._writes(n + 300, 30, range(40, 45), "subj-12"))
        old = self.c
        self.b.restart()
        self.check(
            "old client after restart: count(*)",
            lambda: old.query(FLAT, filter="", output_fields=["count(*)"]),
        )
        self.c = self.b.client()
        self._after("after restart", 30)
        self.check(
            "old client after restart + load: count(*) (expected 0)",
            lambda: (
                int(
                    old.query(
                        FLAT, filter="", output_fields=["count(*)"], consistency_level="Strong"
                    )[0]["count(*)"]
                )
                - len(self.alive)
            ),
        )
        with suppress(Exception):
            self.c.close()
        self.b.crash_after(self._writes(n + 320, 31, range(45, 50), "subj-13"))
        self.c = self.b.client()
        self._after("after SIGKILL", 31)

    def drops(self) -> None:
        c = self.c
        self.check("drop_collection", lambda: c.drop_collection(HNSW))
        self.check("drop_collection(missing)", lambda: c.drop_collection(HNSW))
        self.check("list_collections after drop", lambda: sorted(c.list_collections()))
        c.drop_collection(FLAT)


def hit_id(hit: Any) -> str:
    # A hit's key for the primary key is "face_id" from Lite, "id" from Milvus 2.3 (which
    # does not report the field's name); the Hit.id property reads whichever is there.
    return str(hit.id)


def _fields(description: dict[str, Any]) -> str:
    parts = []
    for f in description["fields"]:
        params = f.get("params") or {}
        size = params.get("max_length") or params.get("dim")
        star = "*" if f.get("is_primary") else ""
        parts.append(
            f"{f['name']}{star}:{DataType(f['type']).name}" + (f"({size})" if size else "")
        )
    return " ".join(parts)


def _list_report(got: list[str], want: list[str]) -> str:
    return (
        f"rows={len(got)}/{len(want)} dupes={len(got) - len(set(got))} "
        f"complete={set(got) == set(want)} pk_order={got == sorted(got)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--milvus-venv", type=Path, default=ROOT / ".venv-milvus")
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--only", choices=("lite", "server"))
    parser.add_argument("--lite-crash-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.lite_crash_child:
        lite_crash_child(*args.lite_crash_child)
        return
    # pymilvus logs every failed call with a traceback; the table reports them instead.
    logging.getLogger("pymilvus").setLevel(logging.CRITICAL)

    data = Data(args.rows)
    facts = Facts()
    timings: dict[str, float] = {}
    names: list[str] = []
    with tempfile.TemporaryDirectory(prefix="milvus-facts-") as tmp:
        makers: dict[str, Callable[[], Backend]] = {
            "lite": lambda: LiteBackend(Path(tmp) / "lite"),
            "server": lambda: ServerBackend(args.milvus_venv.resolve(), Path(tmp), timings),
        }
        for name, make in makers.items():
            if args.only not in (None, name):
                continue
            backend = make()
            names.append(name)
            start = time.monotonic()
            try:
                Probe(backend, facts, data, timings).run()
            finally:
                backend.close()
            timings[f"{name}: whole scenario, s"] = time.monotonic() - start

    print(facts.table(names))
    print()
    for key, value in timings.items():
        print(f"   {key}: {value:.3f}")
    print(json.dumps({"facts": facts.seen, "timings": timings}))


if __name__ == "__main__":
    main()
