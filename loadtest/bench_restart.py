"""Restart benchmark: how long a search service on a large Milvus Lite database takes to
become healthy, with a full rebuild of its in-memory index and from the snapshot it
writes on a clean stop, and whether both answer exactly alike. Run by hand:

    .venv/bin/python loadtest/bench_restart.py --faces 1000000 --database var/bench-1m.db

1. Unless the database exists, it is filled in the benchmark's process (the search
   service's own core, on Milvus Lite): --faces random unit vectors of 128 dimensions
   over 20 cameras (about 4 minutes a million here).
2. `facegrid serve search` is started on it with no snapshot there (a full rebuild), and
   the time to SERVING on grpc.health.v1 measured; it answers --queries searches (top
   10, without and with a camera filter) and reports its face count; then SIGTERM, and
   the time to exit (the snapshot is written then).
3. Started again (from the snapshot): time to SERVING, the same searches and count,
   which must be identical; SIGTERM.

The last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import time
import uuid
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import ServiceProcess, start_service  # noqa: E402
from facegrid.config import StoreSettings  # noqa: E402
from facegrid.internal.v1 import search_pb2, search_pb2_grpc  # noqa: E402
from facegrid.v1 import common_pb2, resources_pb2  # noqa: E402
from facegrid_search import snapshot  # noqa: E402
from facegrid_search.core import SearchCore  # noqa: E402
from facegrid_search.records import CollectionSpec, FaceRow  # noqa: E402

DIM = 128
COLLECTION = "bench"
MODEL = "bench-model"
BATCH = 10_000
S = search_pb2


def fill(database: Path, faces: int) -> float:
    """Fill a new database with ``faces`` faces; seconds taken."""
    calibration = {
        "modelVersion": MODEL,
        "points": [
            {"cosineSimilarity": 0.0, "similarity": 0.0},
            {"cosineSimilarity": 1.0, "similarity": 100.0},
        ],
    }
    definition = {"dimension": DIM, "modelVersion": MODEL, "similarityCalibration": calibration}

    async def run() -> None:
        core = SearchCore(StoreSettings(uri=str(database), index_snapshot=False))
        await core.open()
        await core.create_collection(CollectionSpec(COLLECTION, DIM, MODEL, 1, definition))
        collection = await core.collection(COLLECTION)
        rng = np.random.default_rng(1)
        for first in range(0, faces, BATCH):
            count = min(BATCH, faces - first)
            vectors = rng.normal(size=(count, DIM)).astype(np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            rows = [
                FaceRow(
                    str(uuid.UUID(int=first + i + 1)),
                    source_id=f"cam-{(first + i) % 20}",
                    create_time_us=first + i,
                    attrs={"modelVersion": MODEL},
                )
                for i in range(count)
            ]
            await core.upsert_faces(collection, rows, vectors)
        await core.close()

    started = time.perf_counter()
    asyncio.run(run())
    return time.perf_counter() - started


def answers(service: ServiceProcess, queries: np.ndarray) -> tuple[int, list[list[str]]]:
    """The face count and the top-10 ids of each query, unfiltered then on one camera."""
    with grpc.insecure_channel(service.address) as channel:
        stub = search_pb2_grpc.SearchServiceStub(channel)
        collection = stub.GetCollection(
            S.GetCollectionRequest(name=f"collections/{COLLECTION}"), timeout=60
        ).collection
        found = []
        for face_filter in (None, resources_pb2.FaceFilter(source_ids=["cam-7"])):
            for query in queries:
                reply = stub.SearchFaces(
                    S.SearchFacesRequest(
                        parent=f"collections/{COLLECTION}",
                        queries=[common_pb2.Embedding(values=query.tolist())],
                        model_version=collection.model_version,
                        top_k=10,
                        filter=face_filter,
                    ),
                    timeout=60,
                )
                found.append([m.face.face_id for m in reply.results[0].matches])
    return collection.face_count, found


def start_and_answer(
    database: Path, work: Path, queries: np.ndarray
) -> tuple[dict[str, float], tuple[int, list[list[str]]]]:
    started = time.perf_counter()
    service = start_service("search", [f"store.uri={database}"], work, timeout_s=3600)
    figures = {"to_healthy_s": time.perf_counter() - started}
    try:
        result = answers(service, queries)
    finally:
        stopping = time.perf_counter()
        code = service.stop()
        figures["stop_s"] = time.perf_counter() - stopping
    if code != 0:
        raise SystemExit(f"search exited with {code}:\n{service.log()}")
    return figures, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--faces", type=int, default=1_000_000)
    parser.add_argument("--database", type=Path, default=ROOT / "var" / "bench-restart.db")
    parser.add_argument("--queries", type=int, default=20)
    args = parser.parse_args()
    out: dict[str, object] = {"faces": args.faces}
    if not args.database.exists():
        out["fill_s"] = fill(args.database, args.faces)
        print(f"filled {args.database} in {out['fill_s']:.0f} s", flush=True)
    snapshot.discard(args.database)  # the first start rebuilds in full
    work = args.database.with_name(args.database.name + ".bench")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    rng = np.random.default_rng(2)
    queries = rng.normal(size=(args.queries, DIM)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)

    out["full_rebuild"], rebuilt = start_and_answer(args.database, work, queries)
    print(json.dumps({"partial": out}), flush=True)
    snapshot_bytes = sum(p.stat().st_size for p in snapshot.snapshot_path(args.database).iterdir())
    out["snapshot_mb"] = snapshot_bytes / 1e6
    out["from_snapshot"], restored = start_and_answer(args.database, work, queries)
    out["face_count"] = restored[0]
    out["identical_answers"] = restored == rebuilt
    out["searches_compared"] = len(rebuilt[1])
    print(json.dumps(out))
    if restored != rebuilt:
        raise SystemExit("the restart from the snapshot answered differently")


if __name__ == "__main__":
    main()
