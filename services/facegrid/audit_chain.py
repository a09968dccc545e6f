"""The audit log's hash chain, exactly as the AuditRecord comment defines it.

``record_hash`` is the SHA-256 of the record serialised deterministically, without
unknown fields, with ``record_hash`` empty; ``previous_record_hash`` is the
``record_hash`` of the record with the preceding ``sequence_number``; sequence
numbers start at 1 and grow by exactly 1. Pure functions over messages, so that the
gateway (which writes the hashes), `facegrid audit verify` and the tests agree.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from facegrid.v1 import face_service_pb2 as fs

HASH_BYTES = 32


def record_digest(record: fs.AuditRecord) -> bytes:
    """The ``record_hash`` that ``record`` should carry."""
    copy = fs.AuditRecord()
    copy.CopyFrom(record)
    copy.DiscardUnknownFields()  # type: ignore[attr-defined]
    copy.ClearField("record_hash")
    return hashlib.sha256(copy.SerializeToString(deterministic=True)).digest()


@dataclass(frozen=True)
class ChainBreak:
    """The first place where the chain does not hold."""

    sequence_number: int
    record: str
    problem: str

    def __str__(self) -> str:
        where = f"record {self.sequence_number}"
        if self.record:
            where += f" ({self.record})"
        return f"{where}: {self.problem}"


@dataclass(frozen=True)
class ChainReport:
    """What was checked: the range of records and the newest hash, or the break."""

    records: int
    first_sequence: int | None
    last_sequence: int | None
    last_hash: bytes
    first_break: ChainBreak | None

    @property
    def intact(self) -> bool:
        return self.first_break is None


def verify_chain(
    records: Iterable[fs.AuditRecord],
    *,
    previous_hash: bytes | None = None,
    anchors: Mapping[int, bytes] | None = None,
) -> ChainReport:
    """Check records given in log order; report the first break.

    The records must start with sequence number 1, unless ``previous_hash`` is given:
    then they may start anywhere (a check resumed with ``min_sequence_number``) and
    the first record's ``previous_record_hash`` must equal it. ``anchors`` maps
    sequence numbers to ``record_hash`` values kept elsewhere: each must be met with
    that hash, which is how removing the newest records is detected.
    """
    expected = dict(anchors or {})
    count = 0
    first: int | None = None
    last: fs.AuditRecord | None = None

    def report(problem: ChainBreak | None) -> ChainReport:
        return ChainReport(
            records=count,
            first_sequence=first,
            last_sequence=last.sequence_number if last is not None else None,
            last_hash=bytes(last.record_hash) if last is not None else b"",
            first_break=problem,
        )

    for record in records:
        problem = _check(record, last, previous_hash)
        if problem is None and record.sequence_number in expected:
            anchor = expected.pop(record.sequence_number)
            if record.record_hash != anchor:
                problem = (
                    f"record_hash {record.record_hash.hex()} differs from the kept copy "
                    f"{anchor.hex()}"
                )
        if problem is not None:
            return report(ChainBreak(record.sequence_number, record.name, problem))
        count += 1
        if first is None:
            first = record.sequence_number
        last = record
    if expected:
        missing = min(expected)
        if last is not None and missing < last.sequence_number:
            reason = "missing: it lies before the first record checked"
        else:
            end = f"ends at record {last.sequence_number}" if last is not None else "is empty"
            reason = f"missing: its hash was kept, but the log {end} (newest records removed?)"
        return report(ChainBreak(missing, "", reason))
    return report(None)


def _check(
    record: fs.AuditRecord, last: fs.AuditRecord | None, previous_hash: bytes | None
) -> str | None:
    """Why ``record`` cannot follow ``last`` (None at the start), or None if it can."""
    if last is None:
        if previous_hash is None:
            if record.sequence_number != 1:
                return (
                    f"the log starts at sequence number {record.sequence_number}, not 1 "
                    "(records removed?)"
                )
            if record.previous_record_hash:
                return "the first record has a previous_record_hash"
        elif record.previous_record_hash != previous_hash:
            return (
                f"previous_record_hash {record.previous_record_hash.hex()} differs from "
                f"the expected {previous_hash.hex()}"
            )
    else:
        if record.sequence_number != last.sequence_number + 1:
            return (
                f"follows record {last.sequence_number}: sequence numbers must grow by "
                "exactly 1 (records removed or reordered?)"
            )
        if record.previous_record_hash != last.record_hash:
            return (
                f"previous_record_hash does not equal the record_hash of record "
                f"{last.sequence_number} (that record was altered or replaced?)"
            )
    if len(record.record_hash) != HASH_BYTES:
        return f"record_hash has {len(record.record_hash)} bytes, not {HASH_BYTES}"
    if record.record_hash != record_digest(record):
        return "record_hash does not match the record's content (the record was altered)"
    return None
