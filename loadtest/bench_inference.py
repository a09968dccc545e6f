"""Inference benchmark: embedder and detector, raw vs through the services.

Run by hand (not part of the test suite), after `make all triton-venv`:

    .venv/bin/python loadtest/bench_inference.py

Prints, on the same machine and inputs:
  * faces/s of raw onnxruntime on the embedder, EmbeddingService (local backend) with
    its default mirrored-chip average and without it (embedding.mirror_average=false),
    and EmbeddingService (Triton backend, the bundled tritonserver), at batch 1 and 32;
  * ms per image of DetectionService (local) and of dlib's own
    cnn_face_detection_model_v1 (the face_recognition library's CNN path).
The last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import dlib
import grpc
import numpy as np
import onnxruntime as ort
import skimage.data
from numpy.typing import NDArray
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "e2e"))

from conftest import ServiceProcess, faces_dir, start_service  # noqa: E402
from facegrid.internal.v1 import (  # noqa: E402
    detection_pb2,
    detection_pb2_grpc,
    embedding_pb2,
    embedding_pb2_grpc,
)
from facegrid.models.repository import TritonBackend, onnx_path  # noqa: E402
from facegrid.models.weights import detector_weights, landmarks_weights  # noqa: E402
from facegrid.v1 import common_pb2  # noqa: E402
from facegrid_harness.triton_server import TritonInstall, TritonServer  # noqa: E402
from facegrid_models.build import build_repository  # noqa: E402
from grpc_helpers import png_bytes  # noqa: E402


def timed(run: Callable[[], object], repeat: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return times


def sample_chips(count: int) -> NDArray[np.uint8]:
    image = skimage.data.astronaut()
    predictor = dlib.shape_predictor(str(landmarks_weights()))
    shape = predictor(image, dlib.rectangle(168, 69, 263, 164))
    chip = np.asarray(dlib.get_face_chip(image, shape, size=150, padding=0.25))
    return np.repeat(chip[None], count, axis=0)


def raw_embedder(repo: Path, chips: NDArray[np.uint8], batch: int, repeat: int) -> float:
    session = ort.InferenceSession(str(onnx_path(repo, "face_embedder")))
    feed = {"chips": chips[:batch]}
    times = timed(lambda: session.run(["descriptors"], feed), repeat)
    return batch / statistics.median(times)


def service_embedder(address: str, chips: NDArray[np.uint8], batch: int, repeat: int) -> float:
    request = embedding_pb2.EmbedChipsRequest(
        chips=[common_pb2.Chip(rgb=c.tobytes(), width=150, height=150) for c in chips[:batch]]
    )
    with grpc.insecure_channel(address) as channel:
        stub = embedding_pb2_grpc.EmbeddingServiceStub(channel)
        times = timed(lambda: stub.EmbedChips(request, timeout=60), repeat)
    return batch / statistics.median(times)


def detection_images(limit_side: int = 1000) -> list[tuple[str, NDArray[np.uint8]]]:
    images = [("astronaut.png", skimage.data.astronaut())]
    faces = faces_dir()
    if faces is not None:
        for name in ["misc/obama-480p.jpg", "misc/two_people.jpg", "knn/test/obama_and_biden.jpg"]:
            path = faces / name
            if path.exists():
                image = Image.open(path).convert("RGB")
                image.thumbnail((limit_side, limit_side))
                images.append((name, np.asarray(image)))
    return images


def service_detection_ms(
    address: str, images: list[tuple[str, NDArray[np.uint8]]], upsample: int, repeat: int
) -> dict[str, float]:
    out = {}
    with grpc.insecure_channel(address) as channel:
        stub = detection_pb2_grpc.DetectionServiceStub(channel)
        for name, pixels in images:
            request = detection_pb2.DetectFacesRequest(image=png_bytes(pixels), upsample=upsample)
            out[name] = 1000 * statistics.median(
                timed(lambda r=request: stub.DetectFaces(r, timeout=120), repeat)
            )
    return out


def dlib_detection_ms(
    images: list[tuple[str, NDArray[np.uint8]]], upsample: int, repeat: int
) -> dict[str, float]:
    detector = dlib.cnn_face_detection_model_v1(str(detector_weights()))
    return {
        name: 1000
        * statistics.median(timed(lambda p=pixels: detector(p, upsample), repeat, warmup=1))
        for name, pixels in images
    }


@contextmanager
def services(work: Path, overrides: list[str]) -> Iterator[dict[str, ServiceProcess]]:
    running = {name: start_service(name, overrides, work) for name in ("detection", "embedding")}
    try:
        yield running
    finally:
        for service in running.values():
            service.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--detect-repeat", type=int, default=5)
    parser.add_argument("--upsample", type=int, default=0)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="facegrid-bench-"))
    repo = work / "models"
    build_repository(repo, TritonBackend.PYTHON)
    chips = sample_chips(32)
    images = detection_images()
    figures: dict[str, object] = {"machine_cores": __import__("os").cpu_count()}

    embed: dict[str, dict[str, float]] = {}
    for batch in (1, 32):
        embed.setdefault("raw_onnxruntime", {})[f"batch_{batch}"] = raw_embedder(
            repo, chips, batch, args.repeat
        )
    local = [f"inference.model_repository={repo}", "inference.backend=local"]
    with services(work, [*local, "embedding.mirror_average=false"]) as running:
        for batch in (1, 32):
            embed.setdefault("service_local_plain", {})[f"batch_{batch}"] = service_embedder(
                running["embedding"].address, chips, batch, args.repeat
            )
    with services(work, local) as running:
        for batch in (1, 32):
            embed.setdefault("service_local", {})[f"batch_{batch}"] = service_embedder(
                running["embedding"].address, chips, batch, args.repeat
            )
        detect_service = service_detection_ms(
            running["detection"].address, images, args.upsample, args.detect_repeat
        )
    triton = TritonServer(TritonInstall.discover(ROOT / ".venv-triton"), repo, work / "triton")
    with triton:
        remote = [*local[:1], "inference.backend=triton", f"inference.triton_url={triton.grpc_url}"]
        with services(work, remote) as running:
            for batch in (1, 32):
                embed.setdefault("service_triton", {})[f"batch_{batch}"] = service_embedder(
                    running["embedding"].address, chips, batch, args.repeat
                )
    detect_dlib = dlib_detection_ms(images, args.upsample, max(1, args.detect_repeat // 2))

    print(f"\nEmbedder, faces/s (median of {args.repeat} calls)")
    print(f"{'path':22} {'batch 1':>10} {'batch 32':>10}")
    for path, values in embed.items():
        print(f"{path:22} {values['batch_1']:10.1f} {values['batch_32']:10.1f}")
    ratio = embed["service_local_plain"]["batch_32"] / embed["raw_onnxruntime"]["batch_32"]
    print(f"service (local, plain) / raw onnxruntime at batch 32: {ratio:.3f} (target >= 0.85)")
    mirror_cost = embed["service_local_plain"]["batch_32"] / embed["service_local"]["batch_32"]
    print(f"mirrored-chip average: {mirror_cost:.2f}x the time per face at batch 32 (target <= 2)")

    print(f"\nDetection, ms per image (upsample {args.upsample})")
    print(f"{'image':32} {'DetectionService':>17} {'dlib CNN':>10} {'speed-up':>9}")
    for name, _ in images:
        speedup = detect_dlib[name] / detect_service[name]
        print(f"{name:32} {detect_service[name]:17.1f} {detect_dlib[name]:10.1f} {speedup:9.1f}x")
    total_speedup = sum(detect_dlib.values()) / sum(detect_service.values())
    print(f"overall speed-up: {total_speedup:.1f}x (target >= 8x)")

    figures.update(
        {
            "embedder_faces_per_s": embed,
            "embedding_service_local_vs_raw_batch32": round(ratio, 3),
            "mirror_average_time_ratio_batch32": round(mirror_cost, 3),
            "detection_ms": {"detection_service": detect_service, "dlib_cnn": detect_dlib},
            "detection_speedup_vs_dlib": round(total_speedup, 2),
            "upsample": args.upsample,
        }
    )
    print(json.dumps(figures, sort_keys=True))


if __name__ == "__main__":
    main()
