"""Bulk enrolment: index many photos into a collection, and seed one from a manifest.

:func:`seed_manifest` is what ``facegrid up`` calls once the services are healthy
(``facegrid seed`` does the same with a progress bar). It is idempotent, so it can
run at every start:

* the collection is created if it does not exist (an existing one is kept as it is);
* each subject is created if it does not exist;
* each photo is indexed with a ``request_id`` derived from the collection (its name
  and creation time), the subject and the photo's SHA-256, so a second run stores
  the same faces under the same names instead of a second copy, while a collection
  deleted and created again gets new face ids.

One photo's failure (a corrupt file, a missing path) is recorded in the summary and
the others go on; only errors that would fail every call (no credentials, no
permission, gateway unreachable) stop the run.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

import grpc
from facegrid.rpc_errors import short_rpc_error, status_code
from facegrid.v1 import common_pb2, resources_pb2
from facegrid.v1 import face_service_pb2 as fs
from google.protobuf import json_format, struct_pb2

from facegrid_client.connection import (
    DEFAULT_DEADLINE_S,
    ClientError,
    FaceClient,
)
from facegrid_client.manifest import (
    SUBJECT_ID_PATTERN,
    CollectionSpec,
    Manifest,
    PhotoSpec,
    SubjectSpec,
    load_manifest,
)
from facegrid_client.photos import (
    IMAGE_SUFFIXES,
    PhotoError,
    content_digest,
    resolve_photo,
    safe_external_id,
)

# The demo collection's manifest ships in the package, so `facegrid up` seeds it anywhere.
DEMO_MANIFEST = Path(str(resources.files("facegrid_client.demo").joinpath("demo.toml")))

# Errors that every further call would meet too: stop instead of failing each photo.
FATAL_CODES = frozenset(
    {
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)
# The namespace of the request ids that make indexing repeatable (uuid5).
REQUEST_ID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://facegrid.dev/index-request")
DEFAULT_JOBS = 4

QUALITY_FILTERS = {
    "none": common_pb2.QUALITY_FILTER_NONE,
    "auto": common_pb2.QUALITY_FILTER_AUTO,
    "low": common_pb2.QUALITY_FILTER_LOW,
    "medium": common_pb2.QUALITY_FILTER_MEDIUM,
    "high": common_pb2.QUALITY_FILTER_HIGH,
}


def reason_label(reason: int) -> str:
    """``UNINDEXED_REASON_LOW_CONFIDENCE`` -> ``low confidence``."""
    try:
        name = fs.UnindexedReason.Name(reason)
    except ValueError:
        return f"reason {reason}"
    return name.removeprefix("UNINDEXED_REASON_").replace("_", " ").lower()


@dataclass
class PhotoResult:
    """What happened to one photo."""

    reference: str
    subject_id: str = ""
    face_names: list[str] = field(default_factory=list)
    # One list of reasons per face detected but not stored.
    unindexed: list[list[str]] = field(default_factory=list)
    error: str = ""
    # The status code when the gateway refused the call.
    code: grpc.StatusCode | None = None


@dataclass
class IndexSummary:
    """The outcome of a bulk enrolment, for a table or a few log lines."""

    collection: str
    collection_created: bool = False
    subjects_created: list[str] = field(default_factory=list)
    photos: int = 0
    photos_indexed: int = 0
    photos_without_face: int = 0
    photos_all_unindexed: int = 0
    faces_indexed: int = 0
    unindexed: Counter[str] = field(default_factory=Counter)
    # Files not sent at all, with why (not a JPEG or PNG).
    skipped: list[tuple[str, str]] = field(default_factory=list)
    # Photos that could not be indexed, with the error.
    errors: list[tuple[str, str]] = field(default_factory=list)
    not_attempted: int = 0
    aborted: str = ""
    face_names: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Every photo was read and sent and the gateway accepted each call."""
        return not self.errors and not self.aborted

    def add(self, result: PhotoResult) -> None:
        self.photos += 1
        if result.error:
            self.errors.append((result.reference, result.error))
            return
        self.faces_indexed += len(result.face_names)
        self.face_names.extend(result.face_names)
        for reasons in result.unindexed:
            self.unindexed.update(reasons)
        if result.face_names:
            self.photos_indexed += 1
        elif result.unindexed:
            self.photos_all_unindexed += 1
        else:
            self.photos_without_face += 1

    def __str__(self) -> str:
        """One line, for a log: ``collections/demo: 1 photo, 1 face indexed, ok``."""
        parts = [_count(self.photos, "photo"), f"{_count(self.faces_indexed, 'face')} indexed"]
        if self.collection_created:
            parts.append("collection created")
        if self.subjects_created:
            parts.append(f"{_count(len(self.subjects_created), 'subject')} created")
        unindexed = sum(self.unindexed.values())
        if unindexed:
            parts.append(f"{_count(unindexed, 'face')} not indexed")
        if self.photos_without_face:
            parts.append(f"{_count(self.photos_without_face, 'photo')} with no face")
        if self.errors:
            first_reference, first_message = self.errors[0]
            parts.append(
                f"{_count(len(self.errors), 'error')} (first: {first_reference}: {first_message})"
            )
        if self.aborted:
            parts.append(f"stopped: {self.aborted}")
        return f"{self.collection}: {', '.join(parts)}"

    def lines(self) -> list[str]:
        """The summary as plain lines, for a log (``facegrid up``)."""
        head = (
            f"{self.collection}: {_count(self.photos, 'photo')}, "
            f"{_count(self.faces_indexed, 'face')} indexed"
        )
        if self.collection_created:
            head += " (collection created)"
        lines = [head]
        if self.subjects_created:
            lines.append(f"  subjects created: {', '.join(self.subjects_created)}")
        if self.photos_without_face:
            lines.append(f"  photos with no face: {self.photos_without_face}")
        for reason, count in sorted(self.unindexed.items()):
            lines.append(f"  faces not indexed ({reason}): {count}")
        lines.extend(f"  skipped {reference}: {why}" for reference, why in self.skipped)
        lines.extend(f"  error {reference}: {message}" for reference, message in self.errors)
        if self.aborted:
            lines.append(f"  stopped: {self.aborted} ({self.not_attempted} photos not tried)")
        return lines


ProgressCallback = Callable[[PhotoResult], None]


def _count(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def seed_manifest(
    manifest_path: Path,
    address: str,
    token: str,
    *,
    root: Path | None = None,
    deadline_s: float = DEFAULT_DEADLINE_S,
    jobs: int = DEFAULT_JOBS,
    on_progress: ProgressCallback | None = None,
) -> IndexSummary:
    """Seed the gateway at ``address`` from a manifest; idempotent (see module doc).

    ``root`` overrides the manifest's folder for relative photo paths. Raises
    :class:`~facegrid_client.manifest.ManifestError` for an invalid manifest (before
    any call) and ``grpc.RpcError`` if the collection or a subject cannot be got or
    created; per-photo failures are in the summary (``summary.ok`` is False).
    """
    manifest = load_manifest(manifest_path, root)
    with FaceClient.connect(address, token, deadline_s) as client:
        return seed_with_client(manifest, client, jobs=jobs, on_progress=on_progress)


def seed_with_client(
    manifest: Manifest,
    client: FaceClient,
    *,
    collection_id: str | None = None,
    jobs: int = DEFAULT_JOBS,
    on_progress: ProgressCallback | None = None,
) -> IndexSummary:
    """Seed a parsed manifest through ``client`` (into ``collection_id`` if given)."""
    spec = manifest.collection
    if collection_id is not None:
        spec = replace(spec, id=collection_id)
    collection, created = ensure_collection(client, spec)
    summary = enrol(
        client,
        collection,
        manifest.subjects,
        manifest.photos,
        manifest.root,
        jobs=jobs,
        on_progress=on_progress,
    )
    summary.collection_created = created
    return summary


def ensure_collection(
    client: FaceClient, spec: CollectionSpec
) -> tuple[resources_pb2.Collection, bool]:
    """The collection, created if missing; True if it was created by this call."""
    try:
        return client.get_collection(fs.GetCollectionRequest(name=spec.name)).collection, False
    except grpc.RpcError as error:
        if status_code(error) != grpc.StatusCode.NOT_FOUND:
            raise
    request = fs.CreateCollectionRequest(
        collection_id=spec.id,
        collection=resources_pb2.Collection(
            display_name=spec.display_name, description=spec.description
        ),
    )
    try:
        return client.create_collection(request).collection, True
    except grpc.RpcError as error:
        if status_code(error) != grpc.StatusCode.ALREADY_EXISTS:
            raise
    # Created by someone else in between.
    return client.get_collection(fs.GetCollectionRequest(name=spec.name)).collection, False


def ensure_subject(client: FaceClient, collection: str, spec: SubjectSpec) -> bool:
    """Create the subject if it does not exist; True if this call created it.

    It is looked up first, so that a repeated seed writes no failed CreateSubject
    calls into the audit log. An existing subject is left as it is.
    """
    name = f"{collection}/subjects/{spec.id}"
    try:
        client.get_subject(fs.GetSubjectRequest(name=name))
        return False
    except grpc.RpcError as error:
        if status_code(error) != grpc.StatusCode.NOT_FOUND:
            raise
    subject = resources_pb2.Subject(display_name=spec.display_name)
    if spec.metadata:
        json_format.ParseDict(dict(spec.metadata), subject.metadata)
    try:
        client.create_subject(
            fs.CreateSubjectRequest(parent=collection, subject_id=spec.id, subject=subject)
        )
    except grpc.RpcError as error:
        if status_code(error) != grpc.StatusCode.ALREADY_EXISTS:
            raise
        return False
    return True


def request_id(collection: resources_pb2.Collection, subject_id: str, digest: str) -> str:
    """The IndexFaces request id of one photo: the same on every run, per collection."""
    created = collection.create_time.ToJsonString() if collection.HasField("create_time") else ""
    key = "\n".join([collection.name, created, subject_id, digest])
    return str(uuid.uuid5(REQUEST_ID_NAMESPACE, key))


def enrol(
    client: FaceClient,
    collection: resources_pb2.Collection,
    subjects: Sequence[SubjectSpec],
    photos: Sequence[PhotoSpec],
    root: Path,
    *,
    jobs: int = DEFAULT_JOBS,
    on_progress: ProgressCallback | None = None,
) -> IndexSummary:
    """Create missing subjects, then index every photo, ``jobs`` calls at a time."""
    summary = IndexSummary(collection=collection.name)
    for subject in subjects:
        if ensure_subject(client, collection.name, subject):
            summary.subjects_created.append(subject.id)

    def index_one(photo: PhotoSpec) -> PhotoResult:
        return index_photo(client, collection, photo, root)

    pending: set[Future[PhotoResult]] = set()
    queue = list(reversed(photos))
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        while queue or pending:
            while queue and len(pending) < max(1, jobs) and not summary.aborted:
                pending.add(pool.submit(index_one, queue.pop()))
            if not pending:
                break
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                result = future.result()
                summary.add(result)
                if on_progress is not None:
                    on_progress(result)
            if not summary.aborted:
                summary.aborted = _fatal(done)
        summary.not_attempted = len(queue)
    return summary


def index_photo(
    client: FaceClient, collection: resources_pb2.Collection, photo: PhotoSpec, root: Path
) -> PhotoResult:
    """Index one photo; every failure becomes the result's ``error``."""
    result = PhotoResult(reference=photo.path, subject_id=photo.subject_id)
    try:
        data = resolve_photo(photo.path, root).read_bytes()
        external_image_id = photo.external_image_id or safe_external_id(
            Path(photo.path.rpartition("/")[2]).name
        )
        request = fs.IndexFacesRequest(
            parent=collection.name,
            image=data,
            external_image_id=external_image_id,
            subject_id=photo.subject_id,
            max_faces=photo.max_faces,
            quality_filter=QUALITY_FILTERS[photo.quality],
            source_id=photo.source_id,
            request_id=request_id(collection, photo.subject_id, content_digest(data)),
        )
        if photo.min_face_size:
            request.min_face_size = photo.min_face_size
        if photo.metadata:
            metadata = struct_pb2.Struct()
            json_format.ParseDict(dict(photo.metadata), metadata)
            request.metadata.CopyFrom(metadata)
        reply = client.index_faces(request)
    except PhotoError as error:
        result.error = str(error)
        return result
    except grpc.RpcError as error:
        result.error = short_rpc_error(error)
        result.code = status_code(error)
        return result
    result.face_names = [record.face.name for record in reply.face_records]
    result.unindexed = [
        [reason_label(reason) for reason in face.reasons] for face in reply.unindexed_faces
    ]
    return result


def _fatal(done: set[Future[PhotoResult]]) -> str:
    for future in done:
        code = future.result().code
        if code is not None and code in FATAL_CODES:
            return f"{code.name} from the gateway"
    return ""


# -- folders ------------------------------------------------------------------------


@dataclass
class FolderPlan:
    """What indexing a folder means: photos (with subjects) and files skipped."""

    subjects: list[SubjectSpec] = field(default_factory=list)
    photos: list[PhotoSpec] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def subject_id_for(folder_name: str) -> str:
    """A valid subject id from a person folder's name (spaces and such become ``_``)."""
    cleaned = safe_external_id(folder_name)[:128]
    return cleaned if SUBJECT_ID_PATTERN.fullmatch(cleaned) else "subject"


def plan_folder(folder: Path, subject_id: str = "") -> FolderPlan:
    """The photos of a folder.

    With person subfolders (folders holding images), each subfolder is one subject,
    named after it, holding the images anywhere below it; images directly in
    ``folder`` are indexed without a subject. Without subfolders, every image is
    indexed with ``subject_id`` (or none). Files that are not JPEG or PNG are skipped.
    """
    plan = FolderPlan()
    people = [
        d
        for d in _visible(folder)
        if d.is_dir() and any(p.suffix.lower() in IMAGE_SUFFIXES for p in _files_below(d))
    ]
    if subject_id and people:
        raise ClientError(
            f"{folder} has person subfolders ({people[0].name}, ...): each becomes a "
            "subject, so --subject cannot be used"
        )
    if subject_id:
        plan.subjects.append(SubjectSpec(subject_id))
    for path in _visible(folder):
        if path.is_file():
            _add_file(plan, path, subject_id)
    for person in people:
        spec = SubjectSpec(subject_id_for(person.name), display_name=person.name)
        plan.subjects.append(spec)
        for path in _files_below(person):
            _add_file(plan, path, spec.id)
    return plan


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _files_below(folder: Path) -> list[Path]:
    """Every file anywhere below ``folder``, hidden files and folders left out."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def _add_file(plan: FolderPlan, path: Path, subject_id: str) -> None:
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        plan.skipped.append((str(path), "not a JPEG or PNG file"))
        return
    plan.photos.append(
        PhotoSpec(
            path=str(path),
            entry=str(path),
            subject_id=subject_id,
            external_image_id=safe_external_id(path.name),
        )
    )
