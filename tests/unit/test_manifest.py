"""Seed manifests, photo references, seeding logic and the audit chain verifier.

Nothing here needs a running service: seeding runs against an in-memory FaceService
fake, and the chain verifier against hand-built AuditRecord messages.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import grpc
import pytest
from facegrid.audit_chain import record_digest, verify_chain
from facegrid.rpc_errors import describe_rpc_error
from facegrid.v1 import common_pb2, resources_pb2
from facegrid.v1 import face_service_pb2 as fs
from facegrid_client.connection import FaceClient
from facegrid_client.manifest import ManifestError, load_manifest, parse_manifest
from facegrid_client.photos import PhotoError, resolve_photo, safe_external_id
from facegrid_client.seeding import (
    plan_folder,
    request_id,
    seed_with_client,
    subject_id_for,
)
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEMO = PROJECT_ROOT / "seeds" / "demo.toml"
SHARED_EXAMPLE = PROJECT_ROOT / "seeds" / "examples" / "shared-faces.toml"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
Deadline = float | None

GOOD = """\
format = 1
root = "photos"

[collection]
id = "booking-2024"
display_name = "Bookings 2024"
description = "test"

[defaults]
quality = "medium"
source_id = "scanner-3"
metadata = { batch = "2024-06", origin = "default" }

[[subjects]]
id = "P-000123"
display_name = "Jane Doe"
metadata = { unit = "B" }

[[photos]]
path = "jane/front.jpg"
subject = "P-000123"
external_image_id = "BK-991"
metadata = { origin = "photo", tags = ["a", "b"] }

[[photos]]
path = "/abs/crowd.png"
quality = "none"
max_faces = 5
source_id = "cam:7"
"""


def parse(text: str, root: Path | None = None) -> Any:
    return parse_manifest(text, source=Path("/seeds/test.toml"), root=root)


def problems(text: str) -> list[str]:
    with pytest.raises(ManifestError) as caught:
        parse(text)
    assert str(caught.value).startswith("/seeds/test.toml: invalid manifest")
    return caught.value.problems


# -- manifests --------------------------------------------------------------------------


def test_good_manifest() -> None:
    manifest = parse(GOOD)
    assert manifest.collection.id == "booking-2024"
    assert manifest.collection.name == "collections/booking-2024"
    assert manifest.collection.display_name == "Bookings 2024"
    assert manifest.root == Path("/seeds/photos")
    (subject,) = manifest.subjects
    assert (subject.id, subject.display_name, dict(subject.metadata)) == (
        "P-000123",
        "Jane Doe",
        {"unit": "B"},
    )
    jane, crowd = manifest.photos
    assert jane.subject_id == "P-000123"
    assert jane.external_image_id == "BK-991"
    assert jane.quality == "medium"  # from [defaults]
    assert jane.source_id == "scanner-3"
    assert jane.max_faces == 0  # with a subject: the server's default, 1
    # [defaults] metadata merged in, the photo's own keys win.
    assert dict(jane.metadata) == {"batch": "2024-06", "origin": "photo", "tags": ["a", "b"]}
    assert jane.entry == "[[photos]] #1, line 19"
    assert (crowd.quality, crowd.max_faces, crowd.source_id, crowd.subject_id) == (
        "none",
        5,
        "cam:7",
        "",
    )


def test_root_override_and_default() -> None:
    assert parse(GOOD, root=Path("/elsewhere")).root == Path("/elsewhere")
    minimal = 'format = 1\n[collection]\nid = "c"\n'
    manifest = parse(minimal)
    assert manifest.root == Path("/seeds")
    assert manifest.photos == ()
    assert manifest.subjects == ()


def test_missing_keys_are_each_reported() -> None:
    found = problems('[[photos]]\nsubject = "x"\n')
    assert any('missing key "format"' in p for p in found)
    assert any("missing table [collection]" in p for p in found)
    assert any("[[photos]] #1, line 1: missing key 'path'" in p for p in found)
    assert any("not declared in a [[subjects]] entry" in p for p in found)
    found = problems("format = 1\n[collection]\ndisplay_name = 'x'\n")
    assert found == ["[collection]: missing key 'id'"]
    found = problems('format = 1\n[collection]\nid = "c"\n[[subjects]]\ndisplay_name = "x"\n')
    assert found == ["[[subjects]] #1, line 4: missing key 'id'"]


@pytest.mark.parametrize(
    ("snippet", "expected"),
    [
        ('[collection]\nid = "Demo"', "'Demo' is not a collection id"),
        ('[collection]\nid = "1demo"', "'1demo' is not a collection id"),
        ('[collection]\nid = "demo-"', "'demo-' is not a collection id"),
        ('[collection]\nid = "' + "a" * 64 + '"', "is not a collection id"),
        ('[collection]\nid = "c"\n[[subjects]]\nid = "Jane Doe"', "id 'Jane Doe': use 1 to 128"),
        ('[collection]\nid = "c"\n[[subjects]]\nid = "' + "x" * 129 + '"', "use 1 to 128"),
        (
            '[collection]\nid = "c"\n[[photos]]\npath = "a.jpg"\nexternal_image_id = "a/b.jpg"',
            "external_image_id 'a/b.jpg'",
        ),
        (
            '[collection]\nid = "c"\n[[photos]]\npath = "a.jpg"\nsource_id = "cam 1"',
            "source_id 'cam 1'",
        ),
        ('[collection]\nid = "c"\n[[photos]]\npath = "a.jpg"\nquality = "best"', "quality 'best'"),
        ('[collection]\nid = "c"\n[[photos]]\npath = "a.jpg"\nmax_faces = 0', "1 to 100"),
        ('[collection]\nid = "c"\n[[photos]]\npath = 7', "path must be a string, not a number"),
    ],
)
def test_bad_values(snippet: str, expected: str) -> None:
    found = problems("format = 1\n" + snippet + "\n")
    assert any(expected in p for p in found), found


def test_unknown_keys_name_their_entry_and_line() -> None:
    text = """\
format = 1
colour = "red"

[collection]
id = "c"
owner = "x"

[[subjects]]
id = "s"

[[photos]]
path = "a.jpg"

[[photos]]
path = "b.jpg"
subjet = "s"
"""
    found = problems(text)
    assert any(p.startswith("unknown key 'colour'") for p in found), found
    assert any(p.startswith("[collection]: unknown key 'owner'") for p in found), found
    assert any(p.startswith("[[photos]] #2, line 14: unknown key 'subjet'") for p in found)
    assert len(found) == 3


def test_cross_entry_rules() -> None:
    text = """\
format = 1
[collection]
id = "c"
[[subjects]]
id = "s"
[[subjects]]
id = "s"
[[photos]]
path = "a.jpg"
subject = "s"
max_faces = 3
[[photos]]
path = "a.jpg"
subject = "s"
[[photos]]
path = "b.jpg"
subject = "t"
metadata = { taken = 2024-06-01 }
"""
    found = problems(text)
    assert any("#2, line 6: subject 's' is declared twice" in p for p in found), found
    assert any("#1, line 8: max_faces must be 1" in p for p in found), found
    assert any("#2, line 12: the same photo and subject as [[photos]] #1" in p for p in found)
    assert any("subject 't' is not declared" in p for p in found), found
    assert any("metadata taken: values must be strings" in p for p in found), found


def test_format_version_and_toml_errors() -> None:
    assert any("unsupported format 2" in p for p in problems('format = 2\n[collection]\nid="c"'))
    found = problems('format = 1\n[collection\nid = "c"\n')
    assert len(found) == 1
    assert found[0].startswith("not valid TOML")
    assert "line 2" in found[0]


def test_metadata_size_limit() -> None:
    big = "x" * 9000
    found = problems(f'format = 1\n[collection]\nid = "c"\n[[subjects]]\nid = "s"\n'
                     f'metadata = {{ note = "{big}" }}\n')  # fmt: skip
    assert any("metadata exceeds 8 KiB" in p for p in found), found


def test_unreadable_manifest(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="cannot read"):
        load_manifest(tmp_path / "absent.toml")


# -- photos ---------------------------------------------------------------------------------


def test_package_references_resolve_to_files() -> None:
    for reference in (
        "package:skimage/data/astronaut.png",
        "package:skimage.data/astronaut.png",
        "package:scikit-image/skimage/data/astronaut.png",  # a distribution name
    ):
        photo = resolve_photo(reference, Path("/nonexistent"))
        assert photo.name == "astronaut.png"
        assert photo.read_bytes().startswith(PNG_MAGIC)


@pytest.mark.parametrize(
    ("reference", "message"),
    [
        ("package:skimage/data/no-such.png", "no such file"),
        ("package:no_such_module_xyz/a.png", "no installed module or distribution"),
        ("package:skimage/../etc/passwd", "must stay inside the package"),
        ("package:skimage", "expected package:<package>/<path>"),
        ("missing.jpg", "no such file"),
        ("", "empty photo path"),
    ],
)
def test_bad_photo_references(reference: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(PhotoError, match=message):
        resolve_photo(reference, tmp_path)


def test_relative_paths_start_from_root(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.jpg").write_bytes(b"jpeg")
    assert resolve_photo("a/x.jpg", tmp_path).read_bytes() == b"jpeg"
    assert resolve_photo(str(tmp_path / "a" / "x.jpg"), Path("/")).read_bytes() == b"jpeg"


def test_safe_external_ids() -> None:
    assert safe_external_id("obama2.jpg") == "obama2.jpg"
    assert safe_external_id("Jane Doe (1).jpg") == "Jane_Doe_1_.jpg"
    assert safe_external_id("été.png") == "t_.png"
    assert safe_external_id("???") == "image"
    long = safe_external_id("a" * 300 + ".jpg")
    assert len(long) == 255
    assert long.endswith(".jpg")
    assert subject_id_for("Jane Doe") == "Jane_Doe"


def test_demo_manifest_parses_and_its_photo_resolves() -> None:
    manifest = load_manifest(DEMO)
    assert manifest.collection.id == "demo"
    assert [s.id for s in manifest.subjects] == ["eileen-collins"]
    (photo,) = manifest.photos
    assert photo.path == "package:skimage/data/astronaut.png"
    assert photo.subject_id == "eileen-collins"
    assert photo.metadata["licence"] == "public domain (NASA)"
    data = resolve_photo(photo.path, manifest.root).read_bytes()
    assert data.startswith(PNG_MAGIC)


def test_shared_faces_example(faces: Path) -> None:
    manifest = load_manifest(SHARED_EXAMPLE, root=faces)
    assert len(manifest.subjects) == 5
    for photo in manifest.photos:
        resolve_photo(photo.path, manifest.root)
    # Its default root points at ../shared/data/faces beside the project.
    default = load_manifest(SHARED_EXAMPLE)
    assert default.root.resolve() == (PROJECT_ROOT.parent / "shared/data/faces").resolve()


# -- folders and request ids --------------------------------------------------------------


def test_folder_with_person_subfolders(tmp_path: Path) -> None:
    for relative in ("alice/1.jpg", "alice/more/2.JPEG", "Bob Smith/b.png", "loose.jpg"):
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_bytes(b"x")
    (tmp_path / "alice" / "notes.txt").write_text("x")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "h.jpg").write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    plan = plan_folder(tmp_path)
    assert [(s.id, s.display_name) for s in plan.subjects] == [
        ("Bob_Smith", "Bob Smith"),
        ("alice", "alice"),
    ]
    assert sorted((Path(p.path).name, p.subject_id) for p in plan.photos) == [
        ("1.jpg", "alice"),
        ("2.JPEG", "alice"),
        ("b.png", "Bob_Smith"),
        ("loose.jpg", ""),
    ]
    assert [(Path(f).name, why) for f, why in plan.skipped] == [
        ("notes.txt", "not a JPEG or PNG file")
    ]


def test_flat_folder_with_subject(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(b"x")
    plan = plan_folder(tmp_path, "S-1")
    assert [s.id for s in plan.subjects] == ["S-1"]
    assert [p.subject_id for p in plan.photos] == ["S-1"]
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "b.jpg").write_bytes(b"x")
    with pytest.raises(Exception, match="--subject cannot be used"):
        plan_folder(tmp_path, "S-1")


def test_request_ids_repeat_per_collection_lifetime() -> None:
    first = resources_pb2.Collection(name="collections/c")
    first.create_time.FromSeconds(1000)
    again = resources_pb2.Collection(name="collections/c")
    again.create_time.FromSeconds(2000)
    assert request_id(first, "s", "d1") == request_id(first, "s", "d1")
    assert request_id(first, "s", "d1") != request_id(first, "s", "d2")
    assert request_id(first, "s", "d1") != request_id(first, "t", "d1")
    assert request_id(first, "s", "d1") != request_id(again, "s", "d1")


# -- seeding against a fake FaceService -----------------------------------------------------
# A fake stands in here only to inject failures a real gateway does not produce on demand
# (UNAVAILABLE between two calls, a refusal of one photo); seeding against the real
# gateway, twice, is tested in test_cli.py.


class FakeRpcError(grpc.RpcError):  # type: ignore[misc]
    def __init__(self, code: grpc.StatusCode, message: str, details: Iterable[Any] = ()) -> None:
        super().__init__(message)
        self._code, self._message = code, message
        packed = []
        for detail in details:
            holder = any_pb2.Any()
            holder.Pack(detail)
            packed.append(holder)
        self._status = status_pb2.Status(code=code.value[0], message=message, details=packed)

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._message

    def trailing_metadata(self) -> tuple[tuple[str, bytes], ...]:
        return (("grpc-status-details-bin", self._status.SerializeToString()),)


class FakeFaceService:
    """Collections, subjects and faces in dicts; IndexFaces keyed by request_id."""

    def __init__(self) -> None:
        self.collections: dict[str, resources_pb2.Collection] = {}
        self.subjects: dict[str, resources_pb2.Subject] = {}
        self.faces: dict[str, resources_pb2.Face] = {}
        self.calls: list[str] = []
        self.metadata: list[Any] = []
        self.fail_with: grpc.StatusCode | None = None

    def _record(self, method: str, metadata: Any, timeout: Deadline) -> None:
        assert timeout is not None, "every call needs a deadline"
        assert timeout > 0
        self.calls.append(method)
        self.metadata.append(metadata)

    def GetCollection(  # noqa: N802 - gRPC method names
        self, request: fs.GetCollectionRequest, metadata: Any = None, timeout: Deadline = None
    ) -> fs.GetCollectionResponse:
        self._record("GetCollection", metadata, timeout)
        if request.name not in self.collections:
            raise FakeRpcError(grpc.StatusCode.NOT_FOUND, f"{request.name} not found")
        return fs.GetCollectionResponse(collection=self.collections[request.name])

    def CreateCollection(  # noqa: N802
        self,
        request: fs.CreateCollectionRequest,
        metadata: Any = None,
        timeout: Deadline = None,
    ) -> fs.CreateCollectionResponse:
        self._record("CreateCollection", metadata, timeout)
        collection = resources_pb2.Collection()
        collection.CopyFrom(request.collection)
        collection.name = f"collections/{request.collection_id}"
        collection.create_time.FromSeconds(1_700_000_000 + len(self.calls))
        self.collections[collection.name] = collection
        return fs.CreateCollectionResponse(collection=collection)

    def GetSubject(  # noqa: N802
        self, request: fs.GetSubjectRequest, metadata: Any = None, timeout: Deadline = None
    ) -> fs.GetSubjectResponse:
        self._record("GetSubject", metadata, timeout)
        if request.name not in self.subjects:
            raise FakeRpcError(grpc.StatusCode.NOT_FOUND, f"{request.name} not found")
        return fs.GetSubjectResponse(subject=self.subjects[request.name])

    def CreateSubject(  # noqa: N802
        self, request: fs.CreateSubjectRequest, metadata: Any = None, timeout: Deadline = None
    ) -> fs.CreateSubjectResponse:
        self._record("CreateSubject", metadata, timeout)
        subject = resources_pb2.Subject()
        subject.CopyFrom(request.subject)
        subject.name = f"{request.parent}/subjects/{request.subject_id}"
        subject.subject_id = request.subject_id
        self.subjects[subject.name] = subject
        return fs.CreateSubjectResponse(subject=subject)

    def IndexFaces(  # noqa: N802
        self, request: fs.IndexFacesRequest, metadata: Any = None, timeout: Deadline = None
    ) -> fs.IndexFacesResponse:
        self._record("IndexFaces", metadata, timeout)
        if self.fail_with is not None:
            raise FakeRpcError(self.fail_with, "refused")
        if request.image == b"corrupt":
            raise FakeRpcError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "image: does not decode",
                [
                    error_details_pb2.BadRequest(
                        field_violations=[
                            error_details_pb2.BadRequest.FieldViolation(
                                field="image", description="does not decode"
                            )
                        ]
                    ),
                    error_details_pb2.ErrorInfo(reason="IMAGE_CORRUPT", domain="facegrid.dev"),
                ],
            )
        if request.subject_id:
            assert f"{request.parent}/subjects/{request.subject_id}" in self.subjects
        assert request.request_id, "seeding must set a request_id"
        name = f"{request.parent}/faces/{request.request_id}"
        face = resources_pb2.Face(
            name=name,
            subject_id=request.subject_id,
            external_image_id=request.external_image_id,
            metadata=request.metadata,
        )
        self.faces[name] = face
        reply = fs.IndexFacesResponse(face_records=[fs.FaceRecord(face=face)])
        if request.image == b"two faces":
            reply.unindexed_faces.append(
                fs.UnindexedFace(reasons=[fs.UNINDEXED_REASON_EXCEEDS_MAX_FACES])
            )
        if request.image == b"no face":
            del reply.face_records[:]
            del self.faces[name]
        return reply


def seed_folder(tmp_path: Path, photos: dict[str, bytes]) -> Path:
    lines = ['format = 1\n[collection]\nid = "gallery"\ndisplay_name = "G"\n']
    lines.append('[[subjects]]\nid = "alice"\ndisplay_name = "Alice"\n')
    for file_name, data in photos.items():
        (tmp_path / file_name).write_bytes(data)
        subject = 'subject = "alice"\n' if file_name.startswith("alice") else ""
        lines.append(f'[[photos]]\npath = "{file_name}"\n{subject}metadata = {{ k = "v" }}\n')
    manifest = tmp_path / "gallery.toml"
    manifest.write_text("\n".join(lines))
    return manifest


def test_seeding_is_idempotent(tmp_path: Path) -> None:
    manifest = load_manifest(
        seed_folder(tmp_path, {"alice1.jpg": b"a1", "alice2.jpg": b"two faces", "x.jpg": b"x"})
    )
    service = FakeFaceService()
    client = FaceClient(service, token="secret")
    first = seed_with_client(manifest, client, jobs=2)
    assert first.ok
    assert first.collection_created
    assert first.subjects_created == ["alice"]
    assert (first.photos, first.photos_indexed, first.faces_indexed) == (3, 3, 3)
    assert first.unindexed == {"exceeds max faces": 1}
    assert str(first) == (
        "collections/gallery: 3 photos, 3 faces indexed, collection created, "
        "1 subject created, 1 face not indexed"
    )
    assert service.metadata[0] == (("authorization", "Bearer secret"),)
    stored = dict(service.faces)
    assert {f.external_image_id for f in stored.values()} == {"alice1.jpg", "alice2.jpg", "x.jpg"}
    assert all(f.metadata["k"] == "v" for f in stored.values())

    service.calls.clear()
    second = seed_with_client(manifest, client, jobs=2)
    assert second.ok
    assert not second.collection_created
    assert second.subjects_created == []
    assert "CreateCollection" not in service.calls
    assert "CreateSubject" not in service.calls
    assert service.faces == stored  # the same request ids: no second copy
    assert sorted(second.face_names) == sorted(first.face_names)


def test_seeding_reports_each_photo_and_goes_on(tmp_path: Path) -> None:
    manifest_path = seed_folder(
        tmp_path, {"alice1.jpg": b"corrupt", "b.jpg": b"no face", "c.jpg": b"c"}
    )
    with manifest_path.open("a") as handle:
        handle.write('\n[[photos]]\npath = "missing.jpg"\n')
    summary = seed_with_client(load_manifest(manifest_path), FaceClient(FakeFaceService(), "t"))
    assert not summary.ok
    assert (summary.photos, summary.faces_indexed, summary.photos_without_face) == (4, 1, 1)
    errors = dict(summary.errors)
    # One line; the field violation that the message repeats is left out.
    assert errors["alice1.jpg"] == (
        "INVALID_ARGUMENT: image: does not decode; reason: IMAGE_CORRUPT (facegrid.dev)"
    )
    assert "no such file" in errors["missing.jpg"]
    assert any("error alice1.jpg" in line for line in summary.lines())


def test_seeding_stops_on_errors_every_call_would_meet(tmp_path: Path) -> None:
    manifest = load_manifest(seed_folder(tmp_path, {f"p{i}.jpg": b"x" for i in range(10)}))
    service = FakeFaceService()
    service.fail_with = grpc.StatusCode.PERMISSION_DENIED
    summary = seed_with_client(manifest, FaceClient(service, "t"), jobs=1)
    assert summary.aborted == "PERMISSION_DENIED from the gateway"
    assert (len(summary.errors), summary.not_attempted) == (1, 9)


def test_error_lines() -> None:
    error = FakeRpcError(
        grpc.StatusCode.INVALID_ARGUMENT,
        "context.case_id: required",
        [
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field="context.case_id", description="required"
                    )
                ]
            ),
            error_details_pb2.ErrorInfo(reason="CONTEXT_REQUIRED", domain="facegrid.dev"),
        ],
    )
    assert describe_rpc_error(error) == [
        "INVALID_ARGUMENT: context.case_id: required",
        "  field context.case_id: required",
        "  reason: CONTEXT_REQUIRED (facegrid.dev)",
    ]
    plain = FakeRpcError(grpc.StatusCode.UNAVAILABLE, "connection refused")
    plain._status = status_pb2.Status(code=code_pb2.INTERNAL, message="other")  # mismatched
    assert describe_rpc_error(plain) == ["UNAVAILABLE: connection refused"]


# -- the audit chain ------------------------------------------------------------------------


def chain(count: int) -> list[fs.AuditRecord]:
    """A valid chain, hashed here independently of facegrid.audit_chain."""
    records: list[fs.AuditRecord] = []
    previous = b""
    for sequence in range(1, count + 1):
        record = fs.AuditRecord(
            name=f"auditRecords/r{sequence}",
            sequence_number=sequence,
            principal="investigator-1",
            method="/facegrid.v1.FaceService/SearchFacesByImage",
            context=common_pb2.IdentificationContext(
                purpose=common_pb2.IdentificationContext.PURPOSE_TESTING, case_id=f"case-{sequence}"
            ),
            collection="collections/demo",
            image_digests=[hashlib.sha256(str(sequence).encode()).digest()],
            threshold=common_pb2.MatchThreshold(minimum=80, applied=85, requested=85),
            result_count=sequence % 3,
            result_resources=[f"collections/demo/faces/f{sequence}"],
            previous_record_hash=previous,
        )
        record.create_time.FromSeconds(1_700_000_000 + sequence)
        if sequence % 2:
            record.top_similarity = 90.5
        record.record_hash = hashlib.sha256(record.SerializeToString(deterministic=True)).digest()
        previous = record.record_hash
        records.append(record)
    return records


def rehash(record: fs.AuditRecord) -> None:
    record.record_hash = record_digest(record)


def test_intact_chain_passes() -> None:
    records = chain(6)
    report = verify_chain(records)
    assert report.intact
    assert (report.records, report.first_sequence, report.last_sequence) == (6, 1, 6)
    assert report.last_hash == records[-1].record_hash
    empty = verify_chain([])
    assert empty.intact
    assert empty.records == 0


def test_edited_field_is_reported() -> None:
    records = chain(6)
    records[3].context.case_id = "another-case"
    report = verify_chain(records)
    assert report.first_break is not None
    assert report.first_break.sequence_number == 4
    assert "does not match the record's content" in report.first_break.problem
    assert report.records == 3


def test_edit_with_a_recomputed_hash_breaks_the_next_link() -> None:
    records = chain(6)
    records[2].top_similarity = 99.0
    rehash(records[2])
    report = verify_chain(records)
    assert report.first_break is not None
    assert report.first_break.sequence_number == 4
    assert "previous_record_hash" in report.first_break.problem


def test_removed_record_is_reported() -> None:
    records = chain(6)
    del records[2]
    report = verify_chain(records)
    assert report.first_break is not None
    assert report.first_break.sequence_number == 4
    assert "follows record 2" in report.first_break.problem
    # Renumbered to hide the gap: the hashes no longer link.
    records = chain(6)
    del records[2]
    for record in records[2:]:
        record.sequence_number -= 1
    report = verify_chain(records)
    assert report.first_break is not None
    assert report.first_break.sequence_number == 3
    # The first record removed.
    report = verify_chain(chain(4)[1:])
    assert report.first_break is not None
    assert "starts at sequence number 2" in report.first_break.problem


def test_reordered_record_is_reported() -> None:
    records = chain(6)
    records[2], records[3] = records[3], records[2]
    report = verify_chain(records)
    assert report.first_break is not None
    assert report.first_break.sequence_number == 4
    assert str(report.first_break).startswith("record 4 (auditRecords/r4): follows record 2")


def test_truncation_is_found_only_with_a_kept_hash() -> None:
    records = chain(6)
    kept = {5: records[4].record_hash}
    assert verify_chain(records[:4]).intact  # undetectable without a copy
    report = verify_chain(records[:4], anchors=kept)
    assert report.first_break is not None
    assert report.first_break.sequence_number == 5
    assert "ends at record 4" in report.first_break.problem
    assert verify_chain(records, anchors=kept).intact
    report = verify_chain(records, anchors={5: b"\x00" * 32})
    assert report.first_break is not None
    assert "differs from the kept copy" in report.first_break.problem


def test_resumed_check_from_a_later_record() -> None:
    records = chain(6)
    assert verify_chain(records[3:], previous_hash=records[2].record_hash).intact
    report = verify_chain(records[3:], previous_hash=b"\x01" * 32)
    assert report.first_break is not None
    assert report.first_break.sequence_number == 4


def test_unknown_fields_are_not_hashed() -> None:
    (record,) = chain(1)
    extra = record.SerializeToString() + b"\xa8\x06\x01"  # field 101, varint 1
    parsed = fs.AuditRecord.FromString(extra)
    assert verify_chain([parsed]).intact
