"""Embeddings of labelled faces, from the running services over gRPC.

Evaluation goes through DetectionService and EmbeddingService exactly as the gateway
does, so what is measured is what is served (detector, alignment, chips, model), and
it works the same against local processes or a deployment.

Photos stream through in chunks (detect, embed every face found, forget the chips), so
memory stays bounded whatever the size of the set: 6,922 photos of LFW take about four
minutes on two cores. What each photo gave is kept in an :class:`EmbeddingCache`
(SQLite, keyed by the file's SHA-256, the detector setting and both model versions), so
a second run over the same photos costs seconds.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import sqlite3
import tempfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from facegrid import tls
from facegrid.config import load_settings
from facegrid.internal.v1 import (
    detection_pb2,
    detection_pb2_grpc,
    embedding_pb2,
    embedding_pb2_grpc,
)
from facegrid.v1 import common_pb2
from facegrid_harness import launcher
from numpy.typing import NDArray
from PIL import Image
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from facegrid_eval.labels import IGNORE, LabelError, LabelledPhoto, LabelSet, Role

DEADLINE_S = 120.0  # one photo on a slow CPU, with upsampling
CHIPS_PER_CALL = 64  # well under EmbedChips' 256 and the 32 MiB message limit
PARALLEL_PHOTOS = 4
PHOTOS_PER_CHUNK = 64  # photos in flight between detection and embedding
DEFAULT_CACHE_DIR = Path("var/eval-cache")
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
    quality: common_pb2.FaceQuality | None = None

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
class PhotoFaces:
    """What detection and embedding gave for one photo: every face, largest first."""

    details: list[common_pb2.FaceDetail]  # without chips
    embeddings: NDArray[np.float32]  # one row per detail


class EmbeddingCache:
    """Faces and embeddings per photo, for one pair of model versions.

    One SQLite file per detection and embedding version (their names are part of the
    file name), keyed by the photo's SHA-256 and the detector's upsampling. Written
    as photos finish, so an interrupted run keeps what it measured.
    """

    def __init__(self, folder: Path, detection_version: str, embedding_version: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        name = f"{detection_version}__{embedding_version}".replace("/", "_")
        self.path = folder / f"{name}.sqlite"
        self._db = sqlite3.connect(self.path)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS photos (key TEXT PRIMARY KEY, faces BLOB NOT NULL, "
            "embeddings BLOB NOT NULL, dimension INTEGER NOT NULL)"
        )

    @staticmethod
    def key(sha256: str, upsample: int) -> str:
        return f"{sha256}/u{upsample}"

    def get(self, key: str) -> PhotoFaces | None:
        row = self._db.execute(
            "SELECT faces, embeddings, dimension FROM photos WHERE key = ?", (key,)
        ).fetchone()
        if row is None:
            return None
        response = detection_pb2.DetectFacesResponse.FromString(row[0])
        vectors = np.frombuffer(row[1], np.float32).reshape(-1, max(1, int(row[2])))
        return PhotoFaces(list(response.faces), vectors)

    def put(self, key: str, photo: PhotoFaces) -> None:
        faces = detection_pb2.DetectFacesResponse(faces=photo.details)
        dimension = photo.embeddings.shape[1] if photo.embeddings.size else 1
        self._db.execute(
            "INSERT OR REPLACE INTO photos VALUES (?, ?, ?, ?)",
            (
                key,
                faces.SerializeToString(),
                photo.embeddings.astype(np.float32).tobytes(),
                dimension,
            ),
        )

    def commit(self) -> None:
        self._db.commit()

    def close(self) -> None:
        self._db.commit()
        self._db.close()


class FaceClient:
    """Detection and embedding stubs, with a deadline on every call."""

    def __init__(self, detection: str, embedding: str, deadline_s: float = DEADLINE_S) -> None:
        self.detection_address = detection
        self.embedding_address = embedding
        self._deadline_s = deadline_s
        tls_settings = load_settings().tls  # the internal services may want mutual TLS
        self._channels = [
            tls.channel(detection, tls_settings, _CHANNEL_OPTIONS),
            tls.channel(embedding, tls_settings, _CHANNEL_OPTIONS),
        ]
        self._detect = detection_pb2_grpc.DetectionServiceStub(self._channels[0])
        self._embed = embedding_pb2_grpc.EmbeddingServiceStub(self._channels[1])

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def model_info(self) -> embedding_pb2.GetModelInfoResponse:
        reply: embedding_pb2.GetModelInfoResponse = self._embed.GetModelInfo(
            embedding_pb2.GetModelInfoRequest(), timeout=self._deadline_s
        )
        return reply

    def detection_version(self) -> str:
        """Asked with a small blank image: no face, but the reply names the version."""
        blank = io.BytesIO()
        Image.new("L", (16, 16), 128).save(blank, format="PNG")
        reply = self._detect.DetectFaces(
            detection_pb2.DetectFacesRequest(image=blank.getvalue()),
            timeout=self._deadline_s,
        )
        return str(reply.model_version)

    def embed_set(
        self,
        labels: LabelSet,
        upsample: int = 0,
        console: Console | None = None,
        cache_dir: Path | None = None,
        central: bool = True,
    ) -> FaceSet:
        """Detect, label and embed every face of ``labels``; raise LabelError on a
        manifest photo whose faces do not match its labels. With ``cache_dir``, photos
        measured before (same file, setting and model versions) are not sent again.
        ``central``: a folder photo's labelled face is the one nearest its centre."""
        console = console or Console(stderr=True)
        embedding_version = str(self.model_info().model_version)
        detection_version = self.detection_version()
        cache = (
            EmbeddingCache(cache_dir, detection_version, embedding_version)
            if cache_dir is not None
            else None
        )
        progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )
        found: list[tuple[LabelledPhoto, str, PhotoFaces]] = []
        try:
            with progress, ThreadPoolExecutor(PARALLEL_PHOTOS) as pool:
                task = progress.add_task("detecting and embedding", total=len(labels.photos))
                photos = list(labels.photos)
                for start in range(0, len(photos), PHOTOS_PER_CHUNK):
                    chunk = photos[start : start + PHOTOS_PER_CHUNK]
                    found += self._measure_chunk(labels.root, chunk, upsample, pool, cache)
                    if cache is not None:
                        cache.commit()
                    progress.advance(task, len(chunk))
        finally:
            if cache is not None:
                cache.close()
        faces, vectors, notes = _label_faces(found, central)
        embeddings = np.array(vectors, np.float64).reshape(len(faces), -1)
        norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
        embeddings = embeddings / np.maximum(norms, 1e-12)
        return FaceSet(tuple(faces), embeddings, embedding_version, detection_version, tuple(notes))

    def _measure_chunk(
        self,
        root: Path,
        chunk: Sequence[LabelledPhoto],
        upsample: int,
        pool: ThreadPoolExecutor,
        cache: EmbeddingCache | None,
    ) -> list[tuple[LabelledPhoto, str, PhotoFaces]]:
        digests = list(
            pool.map(lambda p: hashlib.sha256((root / p.path).read_bytes()).hexdigest(), chunk)
        )
        settings = [p.upsample if p.upsample is not None else upsample for p in chunk]
        keys = [EmbeddingCache.key(d, u) for d, u in zip(digests, settings, strict=True)]
        results: dict[int, PhotoFaces] = {}
        missing: list[int] = []
        for i, key in enumerate(keys):
            hit = cache.get(key) if cache is not None else None
            if hit is None:
                missing.append(i)
            else:
                results[i] = hit
        detected = list(
            pool.map(lambda i: self._detect_photo(root, chunk[i], settings[i]), missing)
        )
        chips = [face.chip for faces in detected for face in faces]
        vectors = self._embed_chips(chips)
        offset = 0
        for i, faces in zip(missing, detected, strict=True):
            count = len(faces)
            details = [_without_chip(face) for face in faces]
            photo = PhotoFaces(details, vectors[offset : offset + count])
            offset += count
            results[i] = photo
            if cache is not None:
                cache.put(keys[i], photo)
        return [(chunk[i], digests[i], results[i]) for i in range(len(chunk))]

    def _embed_chips(self, chips: Sequence[common_pb2.Chip]) -> NDArray[np.float32]:
        vectors: list[NDArray[np.float32]] = []
        for start in range(0, len(chips), CHIPS_PER_CALL):
            batch = chips[start : start + CHIPS_PER_CALL]
            try:
                reply = self._embed.EmbedChips(
                    embedding_pb2.EmbedChipsRequest(chips=batch),
                    timeout=self._deadline_s,
                )
            except grpc.RpcError as exc:
                raise RuntimeError(f"EmbedChips failed: {exc.code()}: {exc.details()}") from exc
            vectors += [np.array(e.values, np.float32) for e in reply.embeddings]
        if not vectors:
            return np.zeros((0, 1), np.float32)
        return np.stack(vectors)

    def _detect_photo(
        self, root: Path, photo: LabelledPhoto, upsample: int
    ) -> list[common_pb2.FaceDetail]:
        data = (root / photo.path).read_bytes()
        try:
            reply = self._detect.DetectFaces(
                detection_pb2.DetectFacesRequest(image=data, include_chips=True, upsample=upsample),
                timeout=self._deadline_s,
            )
        except grpc.RpcError as exc:
            raise RuntimeError(
                f"{photo.path}: DetectFaces failed: {exc.code()}: {exc.details()}"
            ) from exc
        return list(reply.faces)


def _without_chip(face: common_pb2.FaceDetail) -> common_pb2.FaceDetail:
    copy = common_pb2.FaceDetail()
    copy.CopyFrom(face)
    copy.ClearField("chip")
    return copy


def _label_faces(
    measured: Sequence[tuple[LabelledPhoto, str, PhotoFaces]], central: bool = True
) -> tuple[list[Face], list[NDArray[np.float32]], list[str]]:
    """Pair detections with labels: the face nearest the centre of a folder photo (or,
    not ``central``, its largest); every face, left to right, of a manifest photo."""
    faces: list[Face] = []
    vectors: list[NDArray[np.float32]] = []
    notes: list[str] = []
    for photo, sha256, result in measured:
        found = list(zip(result.details, result.embeddings, strict=True))  # largest first
        if photo.single_face:
            if not found:
                notes.append(f"{photo.path}: no face found; left out")
                continue
            ordered = [min(found, key=lambda item: _off_centre(item[0]))] if central else found[:1]
        else:
            ordered = sorted(found, key=lambda item: _centre_x(item[0]))
            if len(ordered) != len(photo.labels):
                boxes = ", ".join(_box_text(f) for f, _ in ordered) or "none"
                raise LabelError(
                    f"{photo.path}: labelled with {len(photo.labels)} face(s) but "
                    f"{len(ordered)} found, left to right: {boxes}"
                )
        for index, ((detail, vector), label) in enumerate(zip(ordered, photo.labels, strict=True)):
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
                    file_sha256=sha256,
                    quality=detail.quality,
                )
            )
            vectors.append(vector)
    return faces, vectors, notes


def _off_centre(detail: common_pb2.FaceDetail) -> float:
    """How far a face's centre lies from the photo's, in fractions of its sides."""
    box = detail.bounding_box
    x = box.left_ratio + box.width_ratio / 2 - 0.5
    y = box.top_ratio + box.height_ratio / 2 - 0.5
    return float(x * x + y * y)


def _centre_x(detail: common_pb2.FaceDetail) -> float:
    return float(detail.bounding_box.left + detail.bounding_box.width / 2)


def _box_text(detail: common_pb2.FaceDetail) -> str:
    box = detail.bounding_box
    return f"({box.left},{box.top} {box.width}x{box.height})"


@contextlib.contextmanager
def service_addresses(
    given: dict[str, str | None], overrides: list[str]
) -> Iterator[dict[str, str]]:
    """Addresses of the named services: those given, and the others started here with
    the ``--set`` overrides and stopped afterwards."""
    missing = [name for name, address in given.items() if not address]
    with (
        tempfile.TemporaryDirectory(prefix="facegrid-eval-") as logs,
        contextlib.ExitStack() as stack,
    ):
        addresses = {name: str(address) for name, address in given.items() if address}
        if missing:
            try:
                started = stack.enter_context(
                    launcher.running_services(missing, overrides, Path(logs))
                )
            except (RuntimeError, TimeoutError) as exc:
                raise RuntimeError(f"{exc}\n{_log_tail(Path(logs))}") from exc
            addresses.update(started)
        yield addresses


@contextlib.contextmanager
def face_client(
    detection: str | None, embedding: str | None, overrides: list[str], **kwargs: Any
) -> Iterator[FaceClient]:
    """A client of the given services; those not given are started here."""
    given = {"detection": detection, "embedding": embedding}
    with service_addresses(given, overrides) as addresses:
        client = FaceClient(addresses["detection"], addresses["embedding"], **kwargs)
        try:
            yield client
        finally:
            client.close()


def _log_tail(logs: Path, lines: int = 20) -> str:
    parts = []
    for log in sorted(logs.glob("*.log")):
        tail = log.read_text(errors="replace").splitlines()[-lines:]
        parts.append(f"--- {log.name}\n" + "\n".join(tail))
    return "\n".join(parts)
