"""End-to-end benchmark: FaceService.SearchFacesByImage against its stages and face_recognition.

Run by hand (not part of the test suite), after `make all` and, for the comparison,
`.venv-bench` (see requirements/bench.txt):

    .venv/bin/python loadtest/bench_gateway.py --json var/bench_gateway.json

A one-face 640x480 JPEG (quality 95), cut from ../shared/data/faces/misc/obama-480p.jpg
in memory, is searched against a collection of 100,000 faces: the probe person indexed
once through the gateway from a different photo (misc/obama2.jpg), the rest face-like
synthetic embeddings (loadtest/bench_search.py's generator) upserted straight into the
search service. The four services run as their own processes (ServiceGroup), the
gateway with a bearer token holding every scope.

In the same run, one call after another (no concurrency), interleaved so that drift
in the machine's load touches them all alike, after a warm-up, with a pause after
each call if asked (--pause-ms; 0 by default, now that the services leave no threads
spin-waiting after a call: OpenBLAS in the search service used to burn 0.1 s of CPU):

  * end to end: FaceService.SearchFacesByImage (top 10, PURPOSE_TESTING);
  * each stage alone, over gRPC straight to its service, with the requests the
    gateway sends: DetectionService.DetectFaces (chips included),
    EmbeddingService.EmbedChips (the largest face's chip), SearchService.SearchFaces
    (top 10 at the threshold the gateway reports);

and the ratio of end to end to the sum of the stages (target: at most 1.3 at p50).
The top match must be the face indexed from the other photo.

Then the face_recognition library (1.3.0, its own venv) does the same job on the same
JPEG bytes: decode with PIL, face_locations (HOG, then CNN), face_encodings of the
largest face, and face_distance (Euclidean, as face_recognition computes it) over
100,000 128-d vectors (the same gallery, with that library's own encoding of
misc/obama2.jpg as the indexed face), top 10. That part runs this file under
.venv-bench with --face-recognition-worker, which needs only numpy and Pillow here.

Prints a table; the last line is one JSON object with every figure (also written to
--json PATH).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
FACES = Path(os.environ.get("FACEGRID_TEST_FACES", ROOT.parent / "shared" / "data" / "faces"))
PROBE_SOURCE = FACES / "misc" / "obama-480p.jpg"
# A different photo of the same person (misc/obama.jpg is the same portrait as the probe's
# source, only larger).
ENROLMENT_PHOTO = FACES / "misc" / "obama2.jpg"
BENCH_VENV = ROOT / ".venv-bench"
WORKER_FLAG = "--face-recognition-worker"
COLLECTION_ID = "bench"
PARENT = f"collections/{COLLECTION_ID}"
TOP_K = 10
UPSERT_BATCH = 1000
DETECT_MAX_FACES = 100  # what the gateway asks the detection service for
TARGET_RATIO = 1.3
STATE_FILE = "bench_gateway_state.json"
GALLERY_FILE = "gallery.npy"

if WORKER_FLAG not in sys.argv[1:2]:
    # The face_recognition worker runs this file under .venv-bench: none of these there.
    import grpc
    from facegrid.auth import ALL_SCOPES, bearer_metadata, create_token
    from facegrid.internal.v1 import (
        detection_pb2,
        detection_pb2_grpc,
        embedding_pb2,
        embedding_pb2_grpc,
        search_pb2,
        search_pb2_grpc,
    )
    from facegrid.v1 import common_pb2, face_service_pb2, face_service_pb2_grpc, resources_pb2
    from facegrid_harness.launcher import UP_ORDER, ServiceGroup
    from rich.console import Console
    from rich.table import Table

    sys.path.insert(0, str(ROOT / "loadtest"))
    from bench_search import face_like


def percentiles(times_ms: list[float]) -> dict[str, float]:
    """p50 and p99 (the same rank rule as bench_search.py) of a list of milliseconds."""
    ordered = sorted(times_ms)
    return {
        "p50_ms": statistics.median(ordered),
        "p99_ms": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
        "n": len(ordered),
    }


def timed_ms(run: Callable[[], object]) -> tuple[float, object]:
    """Milliseconds one call took, and what it returned."""
    start = time.perf_counter()
    result = run()
    return (time.perf_counter() - start) * 1000, result


def probe_jpeg() -> bytes:
    """The 640x480 one-face photo: obama-480p.jpg cut to its centre 640 columns, JPEG 95."""
    image = Image.open(PROBE_SOURCE).convert("RGB")
    left = (image.width - 640) // 2
    cropped = image.crop((left, 0, left + 640, 480))
    out = io.BytesIO()
    cropped.save(out, format="JPEG", quality=95)
    return out.getvalue()


# ---------------------------------------------------------------- face_recognition worker


def box_area(box: tuple[int, int, int, int]) -> int:
    """Area of a face_recognition box (top, right, bottom, left)."""
    top, right, bottom, left = box
    return (bottom - top) * (right - left)


def face_recognition_worker(argv: list[str]) -> None:
    """Under .venv-bench: time face_recognition on the photo; print one JSON line."""
    parser = argparse.ArgumentParser()
    parser.add_argument(WORKER_FLAG, action="store_true")
    parser.add_argument("--photo", type=Path, required=True)
    parser.add_argument("--enrolment-photo", type=Path, required=True)
    parser.add_argument("--gallery", type=Path, required=True)
    parser.add_argument("--hog-iterations", type=int, required=True)
    parser.add_argument("--cnn-iterations", type=int, required=True)
    args = parser.parse_args(argv)

    import warnings

    with warnings.catch_warnings():  # face_recognition_models' pkg_resources warning
        warnings.simplefilter("ignore")
        import face_recognition

    # What a face_recognition user holds: one float64 encoding per face, stacked; the
    # enrolled face first, as its own encoding of the other photo.
    enrolment = face_recognition.load_image_file(args.enrolment_photo)
    enrolled_box = max(face_recognition.face_locations(enrolment), key=box_area)
    enrolled = face_recognition.face_encodings(enrolment, known_face_locations=[enrolled_box])[0]
    gallery = np.vstack([enrolled[None, :], np.load(args.gallery).astype(np.float64)])
    jpeg = args.photo.read_bytes()

    def one(model: str) -> dict[str, float | int]:
        marks = [time.perf_counter()]
        pixels = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
        marks.append(time.perf_counter())
        boxes = face_recognition.face_locations(pixels, model=model)  # upsample 1
        marks.append(time.perf_counter())
        largest = max(boxes, key=box_area)
        # Defaults: num_jitters=1, model="small" (5-point landmarks).
        encoding = face_recognition.face_encodings(pixels, known_face_locations=[largest])[0]
        marks.append(time.perf_counter())
        distances = face_recognition.face_distance(gallery, encoding)
        nearest = np.argpartition(distances, TOP_K - 1)[:TOP_K]
        top = nearest[np.argsort(distances[nearest])]
        marks.append(time.perf_counter())
        steps = ["decode", "locate", "encode", "scan"]
        out: dict[str, float | int] = {
            f"{s}_ms": (marks[i + 1] - marks[i]) * 1000 for i, s in enumerate(steps)
        }
        out["total_ms"] = (marks[-1] - marks[0]) * 1000
        out["faces"] = len(boxes)
        out["top"] = int(top[0])
        out["top_distance"] = float(distances[top[0]])
        return out

    report: dict[str, object] = {
        "face_recognition_version": importlib.metadata.version("face_recognition"),
        "gallery_faces": len(gallery),
    }
    for model, iterations in (("hog", args.hog_iterations), ("cnn", args.cnn_iterations)):
        if iterations < 1:
            continue
        one(model)  # warm-up
        runs = [one(model) for _ in range(iterations)]
        summary: dict[str, object] = {
            **percentiles([float(r["total_ms"]) for r in runs]),
            "steps_p50_ms": {
                step: statistics.median(float(r[f"{step}_ms"]) for r in runs)
                for step in ("decode", "locate", "encode", "scan")
            },
            "faces_found": int(runs[0]["faces"]),
            "top_is_enrolled_face": all(r["top"] == 0 for r in runs),
            "top_distance": float(runs[0]["top_distance"]),
        }
        report[model] = summary
    print(json.dumps(report), flush=True)


def run_face_recognition(
    work: Path, jpeg: bytes, gallery: NDArray[np.float32], hog: int, cnn: int
) -> dict[str, Any]:
    """Run the worker under .venv-bench on the same photo and gallery."""
    python = BENCH_VENV / "bin" / "python"
    if not python.exists():
        raise SystemExit(
            f"{python} is missing: python3 -m venv {BENCH_VENV} && {python} -m pip install "
            "--no-deps -r requirements/bench.txt (or pass --skip-face-recognition)"
        )
    photo = work / "probe-640x480.jpg"
    photo.write_bytes(jpeg)
    gallery_path = work / GALLERY_FILE
    if not gallery_path.exists():
        np.save(gallery_path, gallery)
    command = [
        str(python),
        str(Path(__file__).resolve()),
        WORKER_FLAG,
        f"--photo={photo}",
        f"--enrolment-photo={ENROLMENT_PHOTO}",
        f"--gallery={gallery_path}",
        f"--hog-iterations={hog}",
        f"--cnn-iterations={cnn}",
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"face_recognition worker failed:\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


# ---------------------------------------------------------------- facegrid


def start_services(work: Path, token_holder: dict[str, str]) -> ServiceGroup:
    """The four services on free ports, the gateway knowing one caller with every scope."""
    credentials = work / "credentials.json"
    token_file = work / "bench.token"
    if token_file.exists() and credentials.exists():
        token = token_file.read_text().strip()
    else:
        token = create_token(credentials, "bench", ALL_SCOPES)
        token_file.write_text(token + "\n")
    token_holder["token"] = token
    overrides = [
        f"inference.model_repository={ROOT / 'model_repository'}",
        f"store.uri={work / 'facegrid.db'}",
        f"gateway.credentials_file={credentials}",
        f"gateway.audit_path={work / 'audit.db'}",
    ]
    group = ServiceGroup(overrides, work / "logs")
    try:
        for name in UP_ORDER:
            start = time.perf_counter()
            group.start(name, port=0)
            print(f"  {name:10} healthy in {time.perf_counter() - start:5.1f} s", flush=True)
    except BaseException:
        group.stop()
        raise
    return group


def load_gallery(
    work: Path,
    face: face_service_pb2_grpc.FaceServiceStub,
    search: search_pb2_grpc.SearchServiceStub,
    metadata: tuple[tuple[str, str]],
    gallery: NDArray[np.float32],
) -> dict[str, Any]:
    """Create the collection, index the probe person once, upsert the synthetic rest."""
    state_path = work / STATE_FILE
    if state_path.exists():
        state: dict[str, Any] = json.loads(state_path.read_text())
        if state.get("faces") == len(gallery) + 1:
            print(f"reusing {state['faces']:,} faces in {work}", flush=True)
            return state
        raise SystemExit(f"{work} holds {state.get('faces')} faces, not {len(gallery) + 1}")
    created = face.CreateCollection(
        face_service_pb2.CreateCollectionRequest(
            collection_id=COLLECTION_ID,
            collection=resources_pb2.Collection(display_name="bench_gateway"),
        ),
        metadata=metadata,
        timeout=60,
    )
    model_version = created.collection.model_version
    indexed = face.IndexFaces(
        face_service_pb2.IndexFacesRequest(
            parent=PARENT,
            image=ENROLMENT_PHOTO.read_bytes(),
            external_image_id=ENROLMENT_PHOTO.name,
            max_faces=1,
        ),
        metadata=metadata,
        timeout=60,
    )
    if len(indexed.face_records) != 1:
        raise RuntimeError(f"expected one face indexed from {ENROLMENT_PHOTO}: {indexed}")
    start = time.perf_counter()
    for first in range(0, len(gallery), UPSERT_BATCH):
        block = gallery[first : first + UPSERT_BATCH]
        search.BatchUpsertFaces(
            search_pb2.BatchUpsertFacesRequest(
                parent=PARENT,
                faces=[
                    resources_pb2.Face(
                        name=f"{PARENT}/faces/{uuid.uuid4()}",
                        model_version=model_version,
                        embedding=common_pb2.Embedding(values=vector.tolist()),
                    )
                    for vector in block
                ],
            ),
            timeout=600,
        )
    load_s = time.perf_counter() - start
    stored = search.GetCollection(
        search_pb2.GetCollectionRequest(name=PARENT), timeout=60
    ).collection.face_count
    state = {
        "faces": int(stored),
        "model_version": model_version,
        "enrolled_face": indexed.face_records[0].face.name,
        "load_s": load_s,
    }
    state_path.write_text(json.dumps(state, indent=2) + "\n")
    print(f"loaded {len(gallery):,} faces in {load_s:.1f} s ({stored:,} stored)", flush=True)
    return state


def bench_facegrid(
    group: ServiceGroup,
    token: str,
    work: Path,
    jpeg: bytes,
    gallery: NDArray[np.float32],
    n: int,
    pause_s: float,
) -> dict[str, Any]:
    """End to end and each stage alone, interleaved, one call at a time, ``pause_s`` apart."""
    address = {name: service.address for name, service in group.services.items()}
    metadata = bearer_metadata(token)
    channels = [grpc.insecure_channel(address[name]) for name in UP_ORDER]
    try:
        detect = detection_pb2_grpc.DetectionServiceStub(channels[0])
        embed = embedding_pb2_grpc.EmbeddingServiceStub(channels[1])
        search = search_pb2_grpc.SearchServiceStub(channels[2])
        face = face_service_pb2_grpc.FaceServiceStub(channels[3])
        state = load_gallery(work, face, search, metadata, gallery)

        by_image = face_service_pb2.SearchFacesByImageRequest(
            parent=PARENT,
            image=jpeg,
            max_faces=TOP_K,
            context=common_pb2.IdentificationContext(
                purpose=common_pb2.IdentificationContext.PURPOSE_TESTING, case_id="BENCH"
            ),
        )
        first = face.SearchFacesByImage(by_image, metadata=metadata, timeout=60)
        threshold = first.threshold.applied
        detect_request = detection_pb2.DetectFacesRequest(
            image=jpeg, max_faces=DETECT_MAX_FACES, include_chips=True
        )
        detected = detect.DetectFaces(detect_request, timeout=60)
        embed_request = embedding_pb2.EmbedChipsRequest(chips=[detected.faces[0].chip])
        embedded = embed.EmbedChips(embed_request, timeout=60)
        search_request = search_pb2.SearchFacesRequest(
            parent=PARENT,
            queries=[common_pb2.Embedding(values=embedded.embeddings[0].values)],
            model_version=embedded.model_version,
            top_k=TOP_K,
            min_similarity=threshold,
        )
        # Cheap calls that show the cost of a hop: the gateway's GetCollection (one
        # extra hop to search) and search's own; GetAuditRecord adds an audit write.
        get_direct = search_pb2.GetCollectionRequest(name=PARENT)
        get_gateway = face_service_pb2.GetCollectionRequest(name=PARENT)
        get_audit = face_service_pb2.GetAuditRecordRequest(name=first.audit_record)

        calls: dict[str, Callable[[], object]] = {
            "end_to_end": lambda: face.SearchFacesByImage(by_image, metadata=metadata, timeout=60),
            "detect": lambda: detect.DetectFaces(detect_request, timeout=60),
            "embed": lambda: embed.EmbedChips(embed_request, timeout=60),
            "search": lambda: search.SearchFaces(search_request, timeout=60),
            "search_get_collection": lambda: search.GetCollection(get_direct, timeout=60),
            "gateway_get_collection": lambda: face.GetCollection(
                get_gateway, metadata=metadata, timeout=60
            ),
            "gateway_get_audit_record": lambda: face.GetAuditRecord(
                get_audit, metadata=metadata, timeout=60
            ),
        }
        for _ in range(5):  # warm-up
            for call in calls.values():
                call()
        times: dict[str, list[float]] = {name: [] for name in calls}
        replies: list[face_service_pb2.SearchFacesByImageResponse] = []
        for _ in range(n):
            for name, call in calls.items():
                elapsed, reply = timed_ms(call)
                times[name].append(elapsed)
                time.sleep(pause_s)
                if name == "end_to_end":
                    assert isinstance(reply, face_service_pb2.SearchFacesByImageResponse)
                    replies.append(reply)
        stages = ("detect", "embed", "search")
        figures: dict[str, Any] = {name: percentiles(t) for name, t in times.items()}
        stage_sum = {p: sum(figures[s][f"{p}_ms"] for s in stages) for p in ("p50", "p99")}
        figures["sum_of_stages"] = {f"{p}_ms": v for p, v in stage_sum.items()}
        figures["overhead_p50_ms"] = figures["end_to_end"]["p50_ms"] - stage_sum["p50"]
        figures["ratio_p50"] = figures["end_to_end"]["p50_ms"] / stage_sum["p50"]
        figures["ratio_p99"] = figures["end_to_end"]["p99_ms"] / stage_sum["p99"]
        figures["target_ratio"] = TARGET_RATIO
        figures["pause_between_calls_ms"] = pause_s * 1000
        tops = {r.face_matches[0].face.name if r.face_matches else "" for r in replies}
        figures["right_answer"] = tops == {state["enrolled_face"]}
        figures["top_similarity"] = first.face_matches[0].similarity if first.face_matches else None
        figures["matches_returned"] = len(first.face_matches)
        figures["threshold_applied"] = threshold
        figures["detected_faces"] = len(detected.faces)
        figures["face_box"] = {
            "width": detected.faces[0].bounding_box.width,
            "height": detected.faces[0].bounding_box.height,
        }
        figures["gallery_faces"] = state["faces"]
        figures["load_s"] = state.get("load_s")
        figures["model_version"] = embedded.model_version
        return figures
    finally:
        for channel in channels:
            channel.close()


# ---------------------------------------------------------------- report


def print_table(figures: dict[str, Any]) -> None:
    """The figures as rich tables."""
    console = Console()
    g = figures["facegrid"]
    table = Table(
        title=f"SearchFacesByImage, 640x480 one-face JPEG, {g['gallery_faces']:,} faces, "
        f"top {TOP_K}, {g['end_to_end']['n']} calls each"
    )
    for column in ("path", "p50 ms", "p99 ms"):
        table.add_column(column, justify="left" if column == "path" else "right")
    rows = [
        ("FaceService.SearchFacesByImage (end to end)", "end_to_end"),
        ("  DetectionService.DetectFaces (chips)", "detect"),
        ("  EmbeddingService.EmbedChips (1 chip)", "embed"),
        ("  SearchService.SearchFaces (top 10)", "search"),
        ("  sum of the three stages", "sum_of_stages"),
        ("SearchService.GetCollection (hop)", "search_get_collection"),
        ("FaceService.GetCollection (gateway + hop)", "gateway_get_collection"),
        ("FaceService.GetAuditRecord (gateway + audit write)", "gateway_get_audit_record"),
    ]
    for label, key in rows:
        table.add_row(label, f"{g[key]['p50_ms']:.1f}", f"{g[key]['p99_ms']:.1f}")
    table.add_row(
        f"end to end / sum (target <= {TARGET_RATIO})",
        f"{g['ratio_p50']:.2f}x",
        f"{g['ratio_p99']:.2f}x",
    )
    table.add_row("end to end - sum (gateway's own time)", f"{g['overhead_p50_ms']:.1f}", "")
    fr = figures.get("face_recognition")
    if fr:
        for model in [m for m in ("hog", "cnn") if m in fr]:
            steps = fr[model]["steps_p50_ms"]
            table.add_row(
                f"face_recognition {model.upper()} ({fr[model]['n']} calls; "
                + ", ".join(f"{k} {v:.0f}" for k, v in steps.items())
                + ")",
                f"{fr[model]['p50_ms']:.1f}",
                f"{fr[model]['p99_ms']:.1f}",
            )
    console.print(table)
    console.print(
        f"right answer (top match is the face indexed from obama2.jpg): {g['right_answer']}; "
        f"top similarity {g['top_similarity']:.1f} at threshold {g['threshold_applied']:.1f}, "
        f"{g['matches_returned']} match(es)"
    )
    if fr:
        console.print(
            "face_recognition right answer: "
            + ", ".join(
                f"{m.upper()} {fr[m]['top_is_enrolled_face']}" for m in ("hog", "cnn") if m in fr
            )
        )
    if g.get("load_s") is not None:
        console.print(f"loading {g['gallery_faces'] - 1:,} faces took {g['load_s']:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--faces", type=int, default=100_000, help="faces in the collection")
    parser.add_argument("--iterations", type=int, default=200, help="calls of each kind")
    parser.add_argument("--hog-iterations", type=int, default=50, help="face_recognition HOG")
    parser.add_argument("--cnn-iterations", type=int, default=10, help="face_recognition CNN")
    parser.add_argument(
        "--pause-ms",
        type=float,
        default=0,
        help="idle time after each measured call (the services no longer leave threads "
        "spinning: OPENBLAS_NUM_THREADS=1 and onnxruntime without spin-waiting)",
    )
    parser.add_argument("--skip-face-recognition", action="store_true")
    parser.add_argument("--keep-dir", action="store_true", help="keep the work folder")
    parser.add_argument(
        "--reuse", type=Path, help="work folder of an earlier --keep-dir run: skip loading"
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    work = args.reuse or Path(tempfile.mkdtemp(prefix="facegrid-gateway-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    jpeg = probe_jpeg()
    gallery, _, _ = face_like(args.faces - 1, 1, seed=args.faces)
    figures: dict[str, Any] = {
        "machine_cores": os.cpu_count(),
        "photo": "misc/obama-480p.jpg, centre 640x480, JPEG q95",
        "photo_bytes": len(jpeg),
        "load_average_before": os.getloadavg(),
    }
    print(f"work folder {work}", flush=True)
    token: dict[str, str] = {}
    group = start_services(work, token)
    try:
        figures["facegrid"] = bench_facegrid(
            group, token["token"], work, jpeg, gallery, args.iterations, args.pause_ms / 1000
        )
    except BaseException:
        print(f"service logs in {work / 'logs'}", file=sys.stderr)
        raise
    finally:
        group.stop()
    if not args.skip_face_recognition:
        figures["face_recognition"] = run_face_recognition(
            work, jpeg, gallery, args.hog_iterations, args.cnn_iterations
        )
    figures["load_average_after"] = os.getloadavg()
    if not (args.keep_dir or args.reuse):
        shutil.rmtree(work, ignore_errors=True)
    print_table(figures)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")
    print(json.dumps(figures, sort_keys=True))


if __name__ == "__main__":
    if sys.argv[1:2] == [WORKER_FLAG]:
        face_recognition_worker(sys.argv[1:])
    else:
        main()
