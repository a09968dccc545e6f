"""Embeddings of labelled faces, from the running services over gRPC.

Evaluation goes through DetectionService and EmbeddingService exactly as the gateway
does, so what is measured is what is served (detector, alignment, chips, model), and
it works the same against local processes or a deployment.
"""

from __future__ import annotations

import contextlib
import hashlib
import tempfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from numpy.typing import NDArray
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from facegrid import launcher
from facegrid.evaluation.labels import IGNORE, LabelError, LabelledPhoto, LabelSet, Role
from facegrid.v1 import (
    common_pb2,
    detection_pb2,
    detection_pb2_grpc,
    embedding_pb2,
    embedding_pb2_grpc,
)

DEADLINE_S = 120.0  # one photo on a slow CPU, with upsampling
CHIPS_PER_CALL = 64  # well under EmbedChips' 256 and the 32 MiB message limit
PARALLEL_PHOTOS = 4
_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
]


@dataclass(frozen=True)
class Face:
    """One labelled face found in a photo."""

    photo: str
    index: int  # position among the photo's faces, left to right
    label: str
    role: Role
    source: str
    box: tuple[int, int, int, int]  # left, top, width, height
    confidence: float
    file_sha256: str

    @property
    def name(self) -> str:
        return f"{self.photo}#{self.index}"


@dataclass(frozen=True)
class FaceSet:
    faces: tuple[Face, ...]
    embeddings: NDArray[np.float64]  # one unit row per face
    embedding_version: str
    detection_version: str
    notes: tuple[str, ...]  # photos where a folder label found no face, etc.

    def labels(self) -> list[str]:
        return [face.label for face in self.faces]


@dataclass(frozen=True)
class _Detected:
    photo: LabelledPhoto
    sha256: str
    faces: list[common_pb2.FaceDetail]
    version: str


class FaceClient:
    """Detection and embedding stubs, with a deadline on every call."""

    def __init__(self, detection: str, embedding: str, deadline_s: float = DEADLINE_S) -> None:
        self.detection_address = detection
        self.embedding_address = embedding
        self._deadline_s = deadline_s
        self._channels = [
            grpc.insecure_channel(detection, options=_CHANNEL_OPTIONS),
            grpc.insecure_channel(embedding, options=_CHANNEL_OPTIONS),
        ]
        self._detect = detection_pb2_grpc.DetectionServiceStub(self._channels[0])
        self._embed = embedding_pb2_grpc.EmbeddingServiceStub(self._channels[1])

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def model_info(self) -> embedding_pb2.EmbeddingServiceGetModelInfoResponse:
        reply: embedding_pb2.EmbeddingServiceGetModelInfoResponse = self._embed.GetModelInfo(
            embedding_pb2.EmbeddingServiceGetModelInfoRequest(), timeout=self._deadline_s
        )
        return reply

    def embed_set(
        self, labels: LabelSet, upsample: int = 0, console: Console | None = None
    ) -> FaceSet:
        """Detect, label and embed every face of ``labels``; raise LabelError on a
        manifest photo whose faces do not match its labels."""
        console = console or Console(stderr=True)
        progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )
        with progress, ThreadPoolExecutor(PARALLEL_PHOTOS) as pool:
            task = progress.add_task("detecting faces", total=len(labels.photos))
            detected = []
            for result in pool.map(
                lambda p: self._detect_photo(labels.root, p, upsample), labels.photos
            ):
                detected.append(result)
                progress.advance(task)
            faces, chips, notes = _label_faces(detected)
            progress.update(task, description="embedding faces", completed=0, total=len(chips))
            vectors: list[list[float]] = []
            version = ""
            for start in range(0, len(chips), CHIPS_PER_CALL):
                batch = chips[start : start + CHIPS_PER_CALL]
                try:
                    reply = self._embed.EmbedChips(
                        embedding_pb2.EmbeddingServiceEmbedChipsRequest(chips=batch),
                        timeout=self._deadline_s,
                    )
                except grpc.RpcError as exc:
                    raise RuntimeError(f"EmbedChips failed: {exc.code()}: {exc.details()}") from exc
                if version and reply.model_version != version:
                    raise RuntimeError("the embedding model changed while embedding the set")
                vectors += [list(e.values) for e in reply.embeddings]
                version = str(reply.model_version)
                progress.advance(task, len(batch))
        if not version:
            version = str(self.model_info().model_version)
        embeddings = np.array(vectors, np.float64).reshape(len(faces), -1)
        detection_versions = sorted({d.version for d in detected if d.version})
        return FaceSet(
            tuple(faces), embeddings, version, ",".join(detection_versions), tuple(notes)
        )

    def _detect_photo(self, root: Path, photo: LabelledPhoto, upsample: int) -> _Detected:
        data = (root / photo.path).read_bytes()
        try:
            reply = self._detect.DetectFaces(
                detection_pb2.DetectionServiceDetectFacesRequest(
                    image=data,
                    include_chips=True,
                    upsample=photo.upsample if photo.upsample is not None else upsample,
                ),
                timeout=self._deadline_s,
            )
        except grpc.RpcError as exc:
            raise RuntimeError(
                f"{photo.path}: DetectFaces failed: {exc.code()}: {exc.details()}"
            ) from exc
        return _Detected(
            photo, hashlib.sha256(data).hexdigest(), list(reply.faces), reply.model_version
        )


def _label_faces(
    detected: Sequence[_Detected],
) -> tuple[list[Face], list[common_pb2.Chip], list[str]]:
    """Pair detections with labels: the largest face of a folder photo; every face, left
    to right, of a manifest photo."""
    faces: list[Face] = []
    chips: list[common_pb2.Chip] = []
    notes: list[str] = []
    for item in detected:
        photo = item.photo
        found = item.faces  # largest first
        if photo.largest_only:
            if not found:
                notes.append(f"{photo.path}: no face found; left out")
                continue
            ordered = found[:1]
        else:
            ordered = sorted(found, key=_centre_x)
            if len(ordered) != len(photo.labels):
                boxes = ", ".join(_box_text(f) for f in ordered) or "none"
                raise LabelError(
                    f"{photo.path}: labelled with {len(photo.labels)} face(s) but "
                    f"{len(ordered)} found, left to right: {boxes}"
                )
        for index, (detail, label) in enumerate(zip(ordered, photo.labels, strict=True)):
            if label == IGNORE:
                continue
            box = detail.bounding_box
            faces.append(
                Face(
                    photo=photo.path,
                    index=index,
                    label=label,
                    role=photo.role,
                    source=photo.sources[index],
                    box=(int(box.left), int(box.top), int(box.width), int(box.height)),
                    confidence=float(detail.confidence),
                    file_sha256=item.sha256,
                )
            )
            chips.append(detail.chip)
    return faces, chips, notes


def _centre_x(detail: common_pb2.FaceDetail) -> float:
    return float(detail.bounding_box.left + detail.bounding_box.width / 2)


def _box_text(detail: common_pb2.FaceDetail) -> str:
    box = detail.bounding_box
    return f"({box.left},{box.top} {box.width}x{box.height})"


@contextlib.contextmanager
def face_client(
    detection: str | None, embedding: str | None, overrides: list[str], **kwargs: Any
) -> Iterator[FaceClient]:
    """A client of the given services; those not given are started here, with the
    ``--set`` overrides, and stopped afterwards."""
    given = {"detection": detection, "embedding": embedding}
    missing = [name for name, address in given.items() if not address]
    with (
        tempfile.TemporaryDirectory(prefix="facegrid-eval-") as logs,
        contextlib.ExitStack() as stack,
    ):
        if missing:
            try:
                started = stack.enter_context(
                    launcher.running_services(missing, overrides, Path(logs))
                )
            except (RuntimeError, TimeoutError) as exc:
                raise RuntimeError(f"{exc}\n{_log_tail(Path(logs))}") from exc
            given.update(started)
        client = FaceClient(str(given["detection"]), str(given["embedding"]), **kwargs)
        stack.callback(client.close)
        yield client


def _log_tail(logs: Path, lines: int = 20) -> str:
    parts = []
    for log in sorted(logs.glob("*.log")):
        tail = log.read_text(errors="replace").splitlines()[-lines:]
        parts.append(f"--- {log.name}\n" + "\n".join(tail))
    return "\n".join(parts)
