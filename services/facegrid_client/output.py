"""Tables for the command line (rich): results as candidates, with their context.

Every identification result is printed with the threshold (requested, minimum,
applied), the false match rate measured at it and the false candidates to expect from
the faces compared, each candidate with the false match rate at its similarity, the
model version and the audit record under it, and the reminder that it is a candidate
list for review, never an identification.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Sequence

from facegrid.v1 import common_pb2, resources_pb2
from facegrid.v1 import face_service_pb2 as fs
from google.protobuf import json_format, timestamp_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2
from rich.console import Console
from rich.table import Table

from facegrid_client.seeding import IndexSummary

CANDIDATES_NOTICE = "Candidates for review by a trained examiner; not an identification."
# Piped output is not cut to 80 columns: face names alone are 60 characters.
PIPE_WIDTH = 200


def console(stderr: bool = False) -> Console:
    """A console on the current stdout/stderr (looked up now, so tests can capture).

    Markup and emoji codes are off: names, ids and messages are data, and a subject
    called ``[bold]`` or ``:x:`` must print as written.
    """
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() or "COLUMNS" in os.environ else PIPE_WIDTH
    return Console(
        file=stream, width=width, markup=False, emoji=False, highlight=False, soft_wrap=False
    )


def timestamp(value: timestamp_pb2.Timestamp) -> str:
    if value.seconds == 0 and value.nanos == 0:
        return ""
    return value.ToDatetime().strftime("%Y-%m-%d %H:%M:%S UTC")


def purpose_label(purpose: int) -> str:
    """``PURPOSE_CRIMINAL_INVESTIGATION`` -> ``criminal-investigation``."""
    name = common_pb2.IdentificationContext.Purpose.Name(purpose)
    return name.removeprefix("PURPOSE_").replace("_", "-").lower()


def _box(box: common_pb2.BoundingBox) -> str:
    return f"{box.left},{box.top} {box.width}x{box.height}"


def _optional(message: Message, field: str, fmt: str = "{:.0f}") -> str:
    """An ``optional`` field formatted, or empty when unset (not a misleading 0)."""
    return fmt.format(getattr(message, field)) if message.HasField(field) else ""


def rate(value: float) -> str:
    """A false match rate: ``1.2e-05``, or ``0`` (none measured at that level)."""
    return "0" if value == 0 else f"{value:.2g}"


def threshold_line(threshold: common_pb2.MatchThreshold) -> str:
    """``threshold: applied 90.0 (requested 90.0, administrator's minimum 80.0)``."""
    requested = (
        f"requested {threshold.requested:.1f}"
        if threshold.HasField("requested")
        else "none requested"
    )
    collection = (
        f", the collection's {threshold.collection_minimum:.1f}"
        if threshold.HasField("collection_minimum")
        else ""
    )
    return (
        f"threshold: applied {threshold.applied:.1f} ({requested}, "
        f"administrator's minimum {threshold.minimum:.1f}{collection})"
    )


def false_candidates_line(threshold: common_pb2.MatchThreshold) -> str:
    """What the threshold means for the faces compared, in false candidates."""
    return (
        f"false match rate at the threshold: {rate(threshold.false_match_rate)} (at most "
        f"{rate(threshold.false_match_rate_upper_bound)}, 95%), measured on the calibration "
        f"set; {threshold.compared_face_count:,} faces compared: expect about "
        f"{threshold.expected_false_candidates:.2g} false candidates (at most "
        f"{threshold.expected_false_candidates_upper_bound:.2g}) at or above it"
    )


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _footer(
    out: Console, threshold: common_pb2.MatchThreshold, model_version: str, audit_record: str
) -> None:
    out.print(threshold_line(threshold))
    out.print(false_candidates_line(threshold))
    out.print(f"model: {model_version}")
    out.print(f"audit record: {audit_record}")
    out.print(CANDIDATES_NOTICE)


# -- collections, faces, subjects ---------------------------------------------------


def collections_table(out: Console, collections: Sequence[resources_pb2.Collection]) -> None:
    table = Table(title="Collections", title_justify="left")
    for column in ("id", "display name", "faces", "subjects", "model", "created"):
        table.add_column(column, justify="right" if column in ("faces", "subjects") else "left")
    for collection in collections:
        table.add_row(
            collection.name.removeprefix("collections/"),
            collection.display_name,
            str(collection.face_count),
            str(collection.subject_count),
            collection.model_version,
            timestamp(collection.create_time),
        )
    out.print(table)
    if not collections:
        out.print("no collections")


def collection_details(out: Console, collection: resources_pb2.Collection) -> None:
    table = Table(show_header=False, title=collection.name, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    retention = (
        f"{collection.face_retention.ToTimedelta()}"
        if collection.HasField("face_retention")
        else "kept until deleted"
    )
    index = resources_pb2.IndexConfig.Type.Name(collection.index_config.type)
    minimum = (
        f"{collection.min_match_threshold:g}"
        if collection.HasField("min_match_threshold")
        else "the deployment's"
    )
    rows = [
        ("display name", collection.display_name),
        ("description", collection.description),
        ("minimum threshold", minimum),
        ("faces", str(collection.face_count)),
        ("subjects", str(collection.subject_count)),
        ("model version", collection.model_version),
        ("dimension", str(collection.dimension)),
        ("metric", resources_pb2.Metric.Name(collection.metric).removeprefix("METRIC_")),
        ("index", index.removeprefix("TYPE_")),
        ("face retention", retention),
        ("created", timestamp(collection.create_time)),
    ]
    calibration = collection.similarity_calibration
    if calibration.points:
        shown = [
            p for p in calibration.points if len(calibration.points) <= 12 or p.similarity % 10 == 0
        ]
        points = ", ".join(
            f"{p.similarity:.0f}={p.cosine_similarity:.3f}"
            + (f" (FMR {rate(p.false_match_rate)})" if p.HasField("false_match_rate") else "")
            for p in shown
        )
        rows.append(("calibration (similarity=cosine)", points))
        if calibration.description:
            rows.append(("calibrated on", calibration.description))
    for key, value in rows:
        table.add_row(key, value)
    out.print(table)


def faces_table(out: Console, faces: Iterable[resources_pb2.Face]) -> int:
    table = Table(title="Faces", title_justify="left")
    for column in ("face", "subject", "external image id", "source", "confidence", "created"):
        table.add_column(
            column, overflow="fold", justify="right" if column == "confidence" else "left"
        )
    count = 0
    for face in faces:
        count += 1
        table.add_row(
            face.name,
            face.subject_id,
            face.external_image_id,
            face.source_id,
            f"{face.confidence:.1f}",
            timestamp(face.create_time),
        )
    out.print(table)
    return count


def subjects_table(out: Console, subjects: Iterable[resources_pb2.Subject]) -> int:
    table = Table(title="Subjects", title_justify="left")
    for column in ("subject", "display name", "faces", "metadata", "created"):
        table.add_column(column, overflow="fold", justify="right" if column == "faces" else "left")
    count = 0
    for subject in subjects:
        count += 1
        metadata = json_format.MessageToJson(subject.metadata, indent=None)
        table.add_row(
            subject.subject_id,
            subject.display_name,
            str(subject.face_count),
            metadata if subject.metadata.fields else "",
            timestamp(subject.create_time),
        )
    out.print(table)
    return count


# -- detection and identification ----------------------------------------------------


def detect_table(out: Console, reply: fs.DetectFacesResponse, image: str) -> None:
    table = Table(title=f"Faces in {image}, largest first", title_justify="left")
    for column in ("#", "box", "confidence", "size", "sharpness", "brightness", "yaw", "roll"):
        table.add_column(column, justify="left" if column == "box" else "right")
    for index, face in enumerate(reply.faces, 1):
        quality = face.quality
        table.add_row(
            str(index),
            _box(face.bounding_box),
            f"{face.confidence:.1f}",
            str(quality.face_size),
            f"{quality.sharpness:.0f}",
            f"{quality.brightness:.0f}",
            _optional(quality, "yaw"),
            _optional(quality, "roll"),
        )
    out.print(table)
    out.print(
        f"{plural(len(reply.faces), 'face')}; image {reply.image_width}x{reply.image_height} "
        f"after EXIF orientation {reply.orientation}; faces of {reply.min_face_size} px and "
        f"more looked for; model: {reply.model_version}"
    )


def face_matches_table(
    out: Console,
    title: str,
    matches: Sequence[resources_pb2.FaceMatch],
) -> None:
    table = Table(title=title, title_justify="left")
    for column in ("rank", "similarity", "FMR", "face", "subject", "external image id"):
        table.add_column(
            column,
            overflow="fold",
            justify="right" if column in ("rank", "similarity", "FMR") else "left",
        )
    for rank, match in enumerate(matches, 1):
        table.add_row(
            str(rank),
            f"{match.similarity:.1f}",
            rate(match.false_match_rate),
            match.face.name,
            match.face.subject_id,
            match.face.external_image_id,
        )
    out.print(table)
    if not matches:
        out.print("no candidates at or above the threshold")


def search_by_image(out: Console, reply: fs.SearchFacesByImageResponse, image: str) -> None:
    face_matches_table(out, f"Candidate faces for {image}", reply.face_matches)
    _searched_line(out, reply.searched_face, reply.detected_face_count)
    _footer(out, reply.threshold, reply.model_version, reply.audit_record)


def search_by_face(out: Console, reply: fs.SearchFacesResponse) -> None:
    face_matches_table(out, f"Candidate faces for {reply.searched_face}", reply.face_matches)
    _footer(out, reply.threshold, reply.model_version, reply.audit_record)


def subjects_search(out: Console, reply: fs.SearchSubjectsByImageResponse, image: str) -> None:
    table = Table(title=f"Candidate subjects for {image}", title_justify="left")
    columns = ("rank", "similarity", "FMR", "subject", "display name", "best face", "external id")
    for column in columns:
        table.add_column(
            column,
            overflow="fold",
            justify="right" if column in ("rank", "similarity", "FMR") else "left",
        )
    for rank, match in enumerate(reply.subject_matches, 1):
        table.add_row(
            str(rank),
            f"{match.similarity:.1f}",
            rate(match.best_face_match.false_match_rate),
            match.subject.subject_id,
            match.subject.display_name,
            match.best_face_match.face.name,
            match.best_face_match.face.external_image_id,
        )
    out.print(table)
    if not reply.subject_matches:
        out.print("no candidates at or above the threshold")
    _searched_line(out, reply.searched_face, reply.detected_face_count)
    _footer(out, reply.threshold, reply.model_version, reply.audit_record)


def compare(out: Console, reply: fs.CompareFacesResponse, source: str, target: str) -> None:
    table = Table(title=f"Faces of {target} similar to {source}", title_justify="left")
    for column in ("rank", "similarity", "FMR", "cosine", "box in target", "confidence"):
        table.add_column(column, justify="left" if column == "box in target" else "right")
    for rank, match in enumerate(reply.face_matches, 1):
        table.add_row(
            str(rank),
            f"{match.similarity:.1f}",
            rate(match.false_match_rate),
            f"{match.cosine_similarity:.3f}",
            _box(match.face.bounding_box),
            f"{match.face.confidence:.1f}",
        )
    out.print(table)
    if not reply.face_matches:
        out.print("no target face at or above the threshold")
    out.print(
        f"source face: {_box(reply.source_face.bounding_box)}; "
        f"target faces below the threshold or failing the quality filter: "
        f"{len(reply.unmatched_faces)}"
    )
    _footer(out, reply.threshold, reply.model_version, reply.audit_record)


def _searched_line(out: Console, face: common_pb2.FaceDetail, detected: int) -> None:
    line = f"searched face: {_box(face.bounding_box)}, confidence {face.confidence:.1f}"
    if detected > 1:
        line += f" (the largest of {detected} faces; the others were not searched)"
    out.print(line)


# -- enrolment and audit ----------------------------------------------------------------


def index_summary(out: Console, summary: IndexSummary) -> None:
    table = Table(title=f"Indexed into {summary.collection}", title_justify="left")
    table.add_column("")
    table.add_column("count", justify="right")
    rows: list[tuple[str, int]] = [
        ("photos", summary.photos),
        ("photos with faces indexed", summary.photos_indexed),
        ("faces indexed", summary.faces_indexed),
    ]
    rows += [(f"faces not indexed: {r}", n) for r, n in sorted(summary.unindexed.items())]
    rows += [
        ("photos with faces, none indexed", summary.photos_all_unindexed),
        ("photos with no face", summary.photos_without_face),
        ("files skipped", len(summary.skipped)),
        ("errors", len(summary.errors)),
    ]
    if summary.subjects_created:
        rows.append(("subjects created", len(summary.subjects_created)))
    if summary.not_attempted:
        rows.append(("photos not tried", summary.not_attempted))
    for label, count in rows:
        table.add_row(label, str(count))
    out.print(table)
    if summary.collection_created:
        out.print(f"created {summary.collection}")
    for reference, why in summary.skipped:
        out.print(f"skipped {reference}: {why}")
    for reference, message in summary.errors:
        out.print(f"error {reference}: {message}")
    if summary.aborted:
        out.print(f"stopped early: {summary.aborted}")


def audit_table(out: Console, records: Sequence[fs.AuditRecord]) -> None:
    table = Table(title="Audit records", title_justify="left")
    for column in (
        "seq",
        "time",
        "principal",
        "method",
        "purpose",
        "case",
        "collection",
        "results",
        "top",
        "status",
    ):
        table.add_column(column, overflow="fold")
    for record in records:
        has_context = record.HasField("context")
        table.add_row(
            str(record.sequence_number),
            timestamp(record.create_time),
            record.principal,
            record.method.rpartition("/")[2],
            purpose_label(record.context.purpose) if has_context else "",
            record.context.case_id if has_context else "",
            record.collection.removeprefix("collections/"),
            str(record.result_count),
            _optional(record, "top_similarity", "{:.1f}"),
            _rpc_code(record.status_code),
        )
    out.print(table)
    if not records:
        out.print("no audit records")


def _rpc_code(code: int) -> str:
    try:
        return str(code_pb2.Code.Name(code))
    except ValueError:
        return str(code)
