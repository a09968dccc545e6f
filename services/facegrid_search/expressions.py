"""FaceFilter -> Milvus boolean expression.

Values are validated ids (``names.py``) and are also quoted, so the expression's shape
is always ours. Only operators that Milvus Lite and a Milvus 2.3 server both support are
used: ``==``, ``in``, ``>=``, ``<``, ``and``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from facegrid_search.records import FaceFilter


def quote(value: str) -> str:
    return json.dumps(value)


def _in(field: str, values: Iterable[str]) -> str:
    items = sorted(set(values))
    if len(items) == 1:
        return f"{field} == {quote(items[0])}"
    return f"{field} in [{', '.join(quote(v) for v in items)}]"


def filter_expression(face_filter: FaceFilter) -> str:
    """The Milvus expression selecting the faces a filter selects; "" for all."""
    clauses = []
    for field, values in (
        ("subject_id", face_filter.subject_ids),
        ("source_id", face_filter.source_ids),
        ("external_image_id", face_filter.external_image_ids),
        ("image_id", face_filter.image_ids),
    ):
        if values:
            clauses.append(_in(field, values))
    if face_filter.start_time_us is not None:
        clauses.append(f"create_time >= {int(face_filter.start_time_us)}")
    if face_filter.end_time_us is not None:
        clauses.append(f"create_time < {int(face_filter.end_time_us)}")
    if face_filter.has_subject is True:
        clauses.append('subject_id != ""')
    elif face_filter.has_subject is False:
        clauses.append('subject_id == ""')
    return " and ".join(f"({c})" for c in clauses)


def and_(*expressions: str) -> str:
    parts = [e for e in expressions if e]
    return " and ".join(f"({p})" for p in parts)
