"""Search benchmark: numpy, faiss, Milvus Lite alone, and SearchService, on the same data.

Run by hand (not part of the test suite):

    .venv/bin/python loadtest/bench_search.py --sizes 100000 1000000

Data is face-like: clustered unit vectors, many identities with several samples each
(cosine about 0.8 within an identity), 128-d. Queries are fresh samples of stored
identities. For each size it prints p50/p99 latency of single top-10 queries, queries/s
in batches of 32, and recall@10 against exact search (numpy), for: numpy exact, faiss
exact (IndexFlatIP), faiss HNSW, Milvus Lite alone (HNSW index) and SearchService over
gRPC with the embedded default (Milvus Lite + its exact in-memory index), the latter
also with a selective filter (one camera of 20) and with a subject filter. The last
line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import faiss
import grpc
import numpy as np
from numpy.typing import NDArray
from pymilvus import DataType, MilvusClient

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import start_service  # noqa: E402
from facegrid.internal.v1 import search_pb2, search_pb2_grpc  # noqa: E402
from facegrid.v1 import common_pb2, resources_pb2  # noqa: E402

DIM = 128
K = 10
SAMPLES_PER_IDENTITY = 5
SOURCES = 20
MODEL = "bench-model"
S = search_pb2


def face_like(count: int, queries: int, seed: int) -> tuple[NDArray[np.float32], ...]:
    rng = np.random.default_rng(seed)
    identities = max(1, count // SAMPLES_PER_IDENTITY)
    centres = rng.normal(size=(identities, DIM)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    owner = np.arange(count) % identities

    def samples(who: NDArray[np.int64]) -> NDArray[np.float32]:
        noise = rng.normal(scale=0.75 / np.sqrt(DIM), size=(len(who), DIM)).astype(np.float32)
        out = centres[who] + noise
        return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)

    data = samples(owner)
    query_owner = rng.integers(0, identities, queries)
    return data, samples(query_owner), owner.astype(np.int64)


def exact_top(data: NDArray[np.float32], queries: NDArray[np.float32], k: int) -> list[set[int]]:
    scores = queries @ data.T
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    return [set(row.tolist()) for row in top]


def recall(found: list[list[int]], truth: list[set[int]]) -> float:
    hits = sum(len(set(f) & t) for f, t in zip(found, truth, strict=True))
    return hits / sum(len(t) for t in truth)


def latency(run: Callable[[int], object], count: int) -> tuple[float, float]:
    times = []
    for i in range(count):
        start = time.perf_counter()
        run(i)
        times.append((time.perf_counter() - start) * 1000)
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, int(0.99 * len(times)))]


def qps(run: Callable[[int], object], batches: int, batch: int = 32) -> float:
    start = time.perf_counter()
    for i in range(batches):
        run(i)
    return batches * batch / (time.perf_counter() - start)


def bench_numpy(data: NDArray[np.float32], queries: NDArray[np.float32]) -> dict[str, float]:
    def one(i: int) -> object:
        scores = data @ queries[i]
        return np.argpartition(-scores, K - 1)[:K]

    def batch(i: int) -> object:
        block = queries[(i * 32) % (len(queries) - 32) :][:32]
        return np.argpartition(-(block @ data.T), K - 1, axis=1)[:, :K]

    p50, p99 = latency(one, len(queries))
    return {"p50_ms": p50, "p99_ms": p99, "qps_batch32": qps(batch, 10), "recall_at_10": 1.0}


def bench_faiss(
    index: faiss.Index, queries: NDArray[np.float32], truth: list[set[int]]
) -> dict[str, float]:
    p50, p99 = latency(lambda i: index.search(queries[i : i + 1], K), len(queries))
    _, found = index.search(queries, K)
    batch_qps = qps(lambda i: index.search(queries[(i * 32) % (len(queries) - 32) :][:32], K), 10)
    return {
        "p50_ms": p50,
        "p99_ms": p99,
        "qps_batch32": batch_qps,
        "recall_at_10": recall(found.tolist(), truth),
    }


def bench_milvus_lite(
    data: NDArray[np.float32], queries: NDArray[np.float32], truth: list[set[int]], work: Path
) -> dict[str, float]:
    client = MilvusClient(str(work / "lite-alone.db"))
    schema = MilvusClient.create_schema(auto_id=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("embedding", DataType.FLOAT_VECTOR, dim=DIM)
    index = client.prepare_index_params()
    index.add_index(
        field_name="embedding",
        index_type="HNSW",
        metric_type="IP",
        params={"M": 16, "efConstruction": 200},
    )
    client.create_collection("faces", schema=schema, index_params=index)
    start = time.perf_counter()
    for first in range(0, len(data), 5000):
        client.insert(
            "faces",
            [
                {"id": i, "embedding": data[i].tolist()}
                for i in range(first, min(len(data), first + 5000))
            ],
        )
    load_s = time.perf_counter() - start
    params = {"metric_type": "IP", "params": {"ef": 64}}
    count = min(len(queries), 50)

    def one(i: int) -> list[list[dict[str, object]]]:
        return client.search("faces", data=[queries[i].tolist()], limit=K, search_params=params)

    p50, p99 = latency(one, count)
    found = [[int(hit["id"]) for hit in one(i)[0]] for i in range(count)]  # type: ignore[call-overload]
    batch_qps = qps(
        lambda i: client.search("faces", data=queries[:32].tolist(), limit=K, search_params=params),
        2,
    )
    client.close()
    return {
        "p50_ms": p50,
        "p99_ms": p99,
        "qps_batch32": batch_qps,
        "recall_at_10": recall(found, truth[:count]),
        "load_s": load_s,
    }


def calibration() -> common_pb2.SimilarityCalibration:
    return common_pb2.SimilarityCalibration(
        model_version=MODEL,
        points=[
            common_pb2.SimilarityCalibration.Point(cosine_similarity=0.0, similarity=0.0),
            common_pb2.SimilarityCalibration.Point(cosine_similarity=1.0, similarity=100.0),
        ],
    )


def bench_service(
    data: NDArray[np.float32],
    queries: NDArray[np.float32],
    owner: NDArray[np.int64],
    work: Path,
    restart: bool = True,
) -> dict[str, object]:
    service = start_service("search", [f"store.uri={work / 'service.db'}"], work)
    face_ids = [str(uuid.UUID(int=i + 1)) for i in range(len(data))]
    sources = [f"cam-{i % SOURCES}" for i in range(len(data))]
    out: dict[str, object] = {}
    try:
        with grpc.insecure_channel(service.address) as channel:
            stub = search_pb2_grpc.SearchServiceStub(channel)
            stub.CreateCollection(
                S.CreateCollectionRequest(
                    collection_id="bench",
                    collection=resources_pb2.Collection(
                        dimension=DIM, model_version=MODEL, similarity_calibration=calibration()
                    ),
                ),
                timeout=60,
            )
            start = time.perf_counter()
            for first in range(0, len(data), 1000):
                faces = [
                    resources_pb2.Face(
                        name=f"collections/bench/faces/{face_ids[i]}",
                        subject_id="",
                        source_id=sources[i],
                        model_version=MODEL,
                        embedding=common_pb2.Embedding(values=data[i].tolist()),
                    )
                    for i in range(first, min(len(data), first + 1000))
                ]
                stub.BatchUpsertFaces(
                    S.BatchUpsertFacesRequest(parent="collections/bench", faces=faces),
                    timeout=600,
                )
            out["load_s"] = time.perf_counter() - start
            index_of = {face_id: i for i, face_id in enumerate(face_ids)}

            def request(vectors: NDArray[np.float32], **fields: object) -> S.SearchFacesRequest:
                return S.SearchFacesRequest(
                    parent="collections/bench",
                    queries=[common_pb2.Embedding(values=v.tolist()) for v in vectors],
                    model_version=MODEL,
                    top_k=K,
                    **fields,  # type: ignore[arg-type]
                )

            def run(name: str, allowed: NDArray[np.bool_] | None, **fields: object) -> None:
                requests = [request(queries[i : i + 1], **fields) for i in range(len(queries))]
                replies: list[S.SearchFacesResponse] = []
                p50, p99 = latency(
                    lambda i: replies.append(stub.SearchFaces(requests[i], timeout=60)),
                    len(requests),
                )
                found = [[index_of[m.face.face_id] for m in r.results[0].matches] for r in replies]
                subset = np.flatnonzero(allowed) if allowed is not None else np.arange(len(data))
                truth_local = exact_top(data[subset], queries, K)
                truth = [{int(subset[j]) for j in t} for t in truth_local]
                batch = request(queries[:32], **fields)
                out[name] = {
                    "p50_ms": p50,
                    "p99_ms": p99,
                    "qps_batch32": qps(lambda i: stub.SearchFaces(batch, timeout=60), 10),
                    "recall_at_10": recall(found, truth),
                }

            run("no_filter", None)
            print(json.dumps({"partial": out}, default=float), flush=True)
            camera = np.array([s == "cam-7" for s in sources])
            run(
                "filter_one_camera_of_20",
                camera,
                filter=resources_pb2.FaceFilter(source_ids=["cam-7"]),
            )
        service.stop()
        start = time.perf_counter()
        # The restart rebuilds the in-memory index from Milvus Lite: allow it time.
        service = start_service(
            "search", [f"store.uri={work / 'service.db'}"], work, timeout_s=3600
        )
        out["restart_to_healthy_s"] = time.perf_counter() - start
    finally:
        service.stop()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000])
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--skip-lite", action="store_true", help="skip Milvus Lite alone")
    parser.add_argument(
        "--only-service", action="store_true", help="skip numpy, faiss and Milvus Lite alone"
    )
    parser.add_argument("--no-restart", action="store_true", help="skip the restart timing")
    args = parser.parse_args()
    figures: dict[str, object] = {}
    for size in args.sizes:
        work = Path(tempfile.mkdtemp(prefix=f"facegrid-search-{size}-"))
        data, queries, owner = face_like(size, args.queries, seed=size)
        result: dict[str, object] = {}
        if not args.only_service:
            truth = exact_top(data, queries, K)
            flat = faiss.IndexFlatIP(DIM)
            flat.add(data)
            hnsw = faiss.IndexHNSWFlat(DIM, 16, faiss.METRIC_INNER_PRODUCT)
            hnsw.hnsw.efConstruction = 200
            hnsw.add(data)
            hnsw.hnsw.efSearch = 64
            result["numpy_exact"] = bench_numpy(data, queries)
            result["faiss_flat"] = bench_faiss(flat, queries, truth)
            result["faiss_hnsw_ef64"] = bench_faiss(hnsw, queries, truth)
            if not args.skip_lite:
                result["milvus_lite_hnsw"] = bench_milvus_lite(data, queries, truth, work)
        result["search_service"] = bench_service(
            data, queries, owner, work, restart=not args.no_restart
        )
        figures[str(size)] = result
        print(f"\n{size:,} faces, top-{K}")
        print(f"{'path':34} {'p50 ms':>8} {'p99 ms':>8} {'QPS b32':>9} {'recall':>7}")
        rows: list[tuple[str, dict[str, object]]] = []
        for name, value in result.items():
            if name == "search_service":
                assert isinstance(value, dict)
                rows += [(f"SearchService {k}", v) for k, v in value.items() if isinstance(v, dict)]
            else:
                assert isinstance(value, dict)
                rows.append((name, value))
        for name, row in rows:
            print(
                f"{name:34} {row['p50_ms']:8.2f} {row['p99_ms']:8.2f} "
                f"{row['qps_batch32']:9.0f} {row['recall_at_10']:7.3f}"
            )
        service = result["search_service"]
        assert isinstance(service, dict)
        restart = service.get("restart_to_healthy_s")
        print(
            f"SearchService load {service['load_s']:.0f} s, restart to healthy "
            + (f"{restart:.1f} s" if isinstance(restart, float) else "not measured")
        )
    print(json.dumps(figures, sort_keys=True, default=float))


if __name__ == "__main__":
    main()
