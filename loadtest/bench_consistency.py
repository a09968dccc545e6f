"""What each Milvus consistency level costs two search replicas on one Milvus server.

Run by hand (not part of the test suite):

    .venv/bin/python loadtest/bench_consistency.py --faces 5000 --trials 40

Starts a real Milvus 2.3 standalone server (`.venv-milvus`, as the tests do), then for
each of Strong, Bounded, Session and Eventually two SearchService replicas on it with
``store.consistency_level`` set, and through them:

- *search latency*: top-10 searches through the second replica (p50/p99), on a
  collection of --faces faces written through the first;
- *stale after delete*: a face deleted through the first replica, then at once
  searched for (its own vector, top 5) through the second: how often it came back;
- *missed after write*: a new face written through the first, then at once searched for
  through the second: how often it was not found.

Everything started here is stopped on the way out. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from facegrid.internal.v1 import search_pb2, search_pb2_grpc
from facegrid.v1 import common_pb2, resources_pb2
from facegrid_harness.launcher import ServiceGroup
from facegrid_harness.milvus_server import MilvusServer
from numpy.typing import NDArray

ROOT = Path(__file__).resolve().parents[1]
LEVELS = ("Strong", "Bounded", "Session", "Eventually")
DIM = 128
MODEL = "bench-model"
S = search_pb2
TIMEOUT_S = 30.0


def unit(rows: int, seed: int) -> NDArray[np.float32]:
    data = np.random.default_rng(seed).normal(size=(rows, DIM)).astype(np.float32)
    result: NDArray[np.float32] = data / np.linalg.norm(data, axis=1, keepdims=True)
    return result


def embedding(vector: NDArray[np.float32]) -> common_pb2.Embedding:
    return common_pb2.Embedding(values=[float(v) for v in vector])


def face(parent: str, face_id: str, vector: NDArray[np.float32]) -> resources_pb2.Face:
    return resources_pb2.Face(
        name=f"{parent}/faces/{face_id}", model_version=MODEL, embedding=embedding(vector)
    )


def create(stub: search_pb2_grpc.SearchServiceStub, faces: int) -> tuple[str, NDArray[np.float32]]:
    collection_id = f"b{uuid.uuid4().hex[:12]}"
    points = [
        common_pb2.SimilarityCalibration.Point(cosine_similarity=c, similarity=100 * c)
        for c in (0.0, 1.0)
    ]
    stub.CreateCollection(
        S.CreateCollectionRequest(
            collection_id=collection_id,
            collection=resources_pb2.Collection(
                dimension=DIM,
                model_version=MODEL,
                similarity_calibration=common_pb2.SimilarityCalibration(
                    model_version=MODEL, points=points
                ),
            ),
        ),
        timeout=TIMEOUT_S,
    )
    parent = f"collections/{collection_id}"
    vectors = unit(faces, seed=1)
    for start in range(0, faces, 500):
        stub.BatchUpsertFaces(
            S.BatchUpsertFacesRequest(
                parent=parent,
                faces=[
                    face(parent, str(uuid.UUID(int=i + 1)), vectors[i])
                    for i in range(start, min(faces, start + 500))
                ],
            ),
            timeout=TIMEOUT_S,
        )
    return parent, vectors


def search(
    stub: search_pb2_grpc.SearchServiceStub, parent: str, vector: NDArray[np.float32], k: int
) -> list[str]:
    reply = stub.SearchFaces(
        S.SearchFacesRequest(
            parent=parent, queries=[embedding(vector)], model_version=MODEL, top_k=k
        ),
        timeout=TIMEOUT_S,
    )
    return [m.face.face_id for m in reply.results[0].matches]


def measure(level: str, milvus_uri: str, work: Path, faces: int, trials: int) -> dict[str, Any]:
    group = ServiceGroup(
        [f"store.uri={milvus_uri}", f"store.consistency_level={level}"],
        log_dir=work / f"logs-{level}",
    )
    try:
        first = group.start("search", port=0)
        second = group.start("search", port=0, instance="search-2")
        with grpc.insecure_channel(first.address) as a, grpc.insecure_channel(second.address) as b:
            writer = search_pb2_grpc.SearchServiceStub(a)
            reader = search_pb2_grpc.SearchServiceStub(b)
            parent, vectors = create(writer, faces)
            queries = unit(200, seed=2)
            search(reader, parent, queries[0], 10)  # warm
            latencies = []
            for query in queries:
                started = time.perf_counter()
                search(reader, parent, query, 10)
                latencies.append((time.perf_counter() - started) * 1000)
            stale = 0
            for i in range(trials):
                name = f"{parent}/faces/{uuid.UUID(int=i + 1)}"
                writer.BatchDeleteFaces(
                    S.BatchDeleteFacesRequest(parent=parent, names=[name]),
                    timeout=TIMEOUT_S,
                )
                if str(uuid.UUID(int=i + 1)) in search(reader, parent, vectors[i], 5):
                    stale += 1
            missed = 0
            fresh = unit(trials, seed=3)
            for i in range(trials):
                face_id = str(uuid.uuid4())
                writer.BatchUpsertFaces(
                    S.BatchUpsertFacesRequest(
                        parent=parent, faces=[face(parent, face_id, fresh[i])]
                    ),
                    timeout=TIMEOUT_S,
                )
                if face_id not in search(reader, parent, fresh[i], 1):
                    missed += 1
            writer.DeleteCollection(
                S.DeleteCollectionRequest(name=parent, force=True), timeout=TIMEOUT_S
            )
        ordered = sorted(latencies)
        return {
            "level": level,
            "search_p50_ms": statistics.median(latencies),
            "search_p99_ms": ordered[int(0.99 * (len(ordered) - 1))],
            "stale_after_delete": stale,
            "missed_after_write": missed,
            "trials": trials,
        }
    finally:
        group.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--faces", type=int, default=5000)
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--levels", default=",".join(LEVELS))
    args = parser.parse_args()
    venv = ROOT / ".venv-milvus"
    if not (venv / "bin" / "python").exists():
        raise SystemExit(f"{venv} is missing: run `make milvus-venv`")
    results = []
    with tempfile.TemporaryDirectory(prefix="facegrid-consistency-") as folder:
        work = Path(folder)
        with MilvusServer(venv, work / "milvus") as milvus:
            for level in args.levels.split(","):
                print(f"{level} ...", flush=True)
                results.append(measure(level, milvus.uri, work, args.faces, args.trials))
    print("level        search p50 / p99      stale after delete   missed after write")
    for r in results:
        print(
            f"{r['level']:12} {r['search_p50_ms']:7.1f} / {r['search_p99_ms']:7.1f} ms "
            f"{r['stale_after_delete']:>8} of {r['trials']:<10} "
            f"{r['missed_after_write']:>8} of {r['trials']}"
        )
    print(json.dumps({"faces": args.faces, "results": results}))


if __name__ == "__main__":
    sys.exit(main())
