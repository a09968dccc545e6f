"""Hypothesis strategies for any protobuf request message, built from its descriptor.

Every field may be set or left unset; scalars range over their whole type (NaN and
infinities included, enum numbers the contract does not define), strings and bytes mix
random values with plausible ones (resource names and ids of things that exist, images
real, truncated, corrupted or claiming huge sizes), so that generated requests reach past
the first validation as well as failing it. Well-known types get values of their own
shape (a Struct is JSON, a FieldMask lists field paths, a Timestamp any int64 seconds).
"""

from __future__ import annotations

import io
import struct
import uuid
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
from google.protobuf import descriptor, message, message_factory, struct_pb2
from hypothesis import strategies as st
from PIL import Image

FD = descriptor.FieldDescriptor
MAX_DEPTH = 4


def _png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def _jpeg(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=80)
    return out.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG header that claims a size the data does not have (a decompression bomb's)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


class Vocabulary:
    """The plausible values: names and ids of things that exist, and real images."""

    def __init__(self, names: Sequence[str], ids: Sequence[str], images: Sequence[bytes]) -> None:
        rng = np.random.default_rng(7)
        noise = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
        jpeg = _jpeg(noise)
        flipped = bytearray(jpeg)
        for index in rng.integers(0, len(flipped), 40):
            flipped[int(index)] ^= 0xFF
        self.good_names = list(names)
        self.good_ids = list(ids)
        self.good_images = [*images, jpeg]
        self.names = [*names, "", "collections/-", "collections/fuzz/faces/-", f"x/{uuid.uuid4()}"]
        self.ids = [*ids, "", "-", "a" * 64, "A", "ok-id", str(uuid.uuid4()), "a b", "é"]
        self.images = [
            *images,
            b"",
            jpeg,
            jpeg[: len(jpeg) // 2],
            bytes(flipped),
            _png(noise),
            _png(np.zeros((1, 1, 3), np.uint8)),
            _png_claiming(60_000, 60_000),
            _png_claiming(0, 10),
            b"GIF89a" + bytes(20),
            b"\xff\xd8\xff" + bytes(100),
        ]


def _text(vocabulary: list[str]) -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(vocabulary), st.text(max_size=80))


def _string_strategy(field: FD, words: Vocabulary) -> st.SearchStrategy[str]:
    name = field.name
    if name in ("name", "parent") or name.endswith(("_name", "names")):
        return _text(words.names)
    if name.endswith(("_id", "_ids", "token", "case_id")):
        return _text(words.ids)
    return st.text(max_size=200)


def _bytes_strategy(words: Vocabulary) -> st.SearchStrategy[bytes]:
    return st.one_of(st.sampled_from(words.images), st.binary(max_size=512))


_INTS = {
    FD.TYPE_INT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FD.TYPE_INT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FD.TYPE_UINT32: (0, 2**32 - 1),
    FD.TYPE_FIXED32: (0, 2**32 - 1),
    FD.TYPE_UINT64: (0, 2**64 - 1),
    FD.TYPE_FIXED64: (0, 2**64 - 1),
}


def _int_strategy(low: int, high: int) -> st.SearchStrategy[int]:
    small = st.integers(max(low, -3), min(high, 1100))
    return st.one_of(small, st.sampled_from([low, high]), st.integers(low, high))


def _json_value() -> st.SearchStrategy[Any]:
    leaves = st.one_of(st.none(), st.booleans(), st.floats(allow_nan=False), st.text(max_size=30))
    return st.recursive(
        leaves,
        lambda children: st.one_of(
            st.lists(children, max_size=3),
            st.dictionaries(st.text(max_size=10), children, max_size=3),
        ),
        max_leaves=8,
    )


def _struct() -> st.SearchStrategy[struct_pb2.Struct]:
    def build(values: dict[str, Any]) -> struct_pb2.Struct:
        made = struct_pb2.Struct()
        made.update(values)
        return made

    return st.dictionaries(st.text(max_size=20), _json_value(), max_size=4).map(build)


def _plausible_scalar(field: FD, words: Vocabulary) -> st.SearchStrategy[Any]:
    """Values a careful caller might send: small counts, similarities, known names."""
    kind = field.type
    if kind in _INTS:
        return st.sampled_from([0, 1, 5, 40, 100])
    if kind in (FD.TYPE_FLOAT, FD.TYPE_DOUBLE):
        return st.floats(0, 100, width=32 if kind == FD.TYPE_FLOAT else 64)
    if kind == FD.TYPE_STRING:
        name = field.name
        if name == "request_id":
            return st.uuids().map(str)
        if name in ("name", "parent") or name.endswith(("_name", "names")):
            return st.sampled_from(words.good_names)
        if name.endswith(("_id", "_ids")):
            return st.sampled_from(words.good_ids)
        if name.endswith("token"):
            return st.just("")
        if name in ("subject", "face", "collection", "stream_processor"):
            return st.sampled_from(words.good_names)
        return st.text(max_size=20)
    if kind == FD.TYPE_BYTES:
        return st.sampled_from(words.good_images)
    if kind == FD.TYPE_ENUM:
        defined = [value.number for value in field.enum_type.values]
        return st.sampled_from([n for n in defined if n] or defined)  # not _UNSPECIFIED
    return _scalar_strategy(field, words)


def _scalar_strategy(field: FD, words: Vocabulary) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind in _INTS:
        return _int_strategy(*_INTS[kind])
    if kind == FD.TYPE_FLOAT:
        return st.one_of(st.floats(width=32), st.floats(-1.5, 101, width=32))
    if kind == FD.TYPE_DOUBLE:
        return st.floats()
    if kind == FD.TYPE_BOOL:
        return st.booleans()
    if kind == FD.TYPE_STRING:
        return _string_strategy(field, words)
    if kind == FD.TYPE_BYTES:
        return _bytes_strategy(words)
    if kind == FD.TYPE_ENUM:
        numbers = [value.number for value in field.enum_type.values]
        return st.one_of(st.sampled_from(numbers), st.integers(-3, max(numbers) + 5))
    raise TypeError(f"unhandled field type {kind} of {field.full_name}")


def _embedding_values() -> st.SearchStrategy[list[float]]:
    def unit(seed: int) -> list[float]:
        vector = np.random.default_rng(seed).normal(size=128)
        return (vector / np.linalg.norm(vector)).astype(np.float32).tolist()

    return st.one_of(
        st.integers(0, 2**32 - 1).map(unit),
        st.lists(st.floats(width=32), max_size=4),
        st.lists(st.floats(-1, 1, width=32), min_size=128, max_size=128),
    )


def _field_strategy(
    field: FD, words: Vocabulary, depth: int, plausible: bool
) -> st.SearchStrategy[Any] | None:
    if field.message_type is not None:
        if field.message_type.GetOptions().map_entry:
            key_field = field.message_type.fields_by_name["key"]
            value_field = field.message_type.fields_by_name["value"]
            value = _field_strategy(value_field, words, depth + 1, plausible)
            if value is None:
                return None
            return st.dictionaries(_scalar_strategy(key_field, words), value, max_size=3)
        if depth >= MAX_DEPTH:
            return None
        single = _message(field.message_type, words, depth + 1, plausible)
    elif field.name == "values" and field.containing_type.name == "Embedding":
        return _embedding_values()
    elif plausible:
        single = _plausible_scalar(field, words)
    else:
        single = _scalar_strategy(field, words)
    if field.is_repeated:
        return st.lists(single, min_size=1 if plausible else 0, max_size=2 if plausible else 4)
    return single


def message_strategy(
    desc: descriptor.Descriptor, words: Vocabulary
) -> st.SearchStrategy[message.Message]:
    """Messages of type ``desc``: half of them plausible (every field of the outer levels
    set to a value a careful caller might send, so that many get past the first
    validation; hypothesis starts with these), half anything at all."""
    return st.one_of(_message(desc, words, 0, True), _message(desc, words, 0, False))


def _message(
    desc: descriptor.Descriptor, words: Vocabulary, depth: int, plausible: bool
) -> st.SearchStrategy[message.Message]:
    if desc.full_name == "google.protobuf.Struct":
        return _struct()
    cls = message_factory.GetMessageClass(desc)
    if desc.full_name == "google.protobuf.FieldMask":
        paths = st.lists(st.one_of(st.sampled_from(_all_paths()), st.text(max_size=30)), max_size=4)
        return paths.map(lambda p: cls(paths=p))
    fields = {}
    for field in desc.fields:
        made = _field_strategy(field, words, depth, plausible)
        if made is not None:
            fields[field.name] = made

    def build(values: dict[str, Any]) -> message.Message:
        return cls(**values)

    if plausible and depth < 2:
        # Every field set, one member of each oneof (the others dropped).
        chosen: dict[str, st.SearchStrategy[Any]] = {}
        for oneof in desc.oneofs:
            members = [f.name for f in oneof.fields if f.name in fields]
            if members and not oneof.name.startswith("_"):  # "_x": a proto3 optional
                keep = members[0]
                for member in members:
                    if member != keep:
                        chosen[member] = fields.pop(member)
        return st.fixed_dictionaries(fields, optional=chosen).map(build)
    return st.fixed_dictionaries({}, optional=fields).map(build)


def _all_paths() -> list[str]:
    # Fields that update masks of the public API name, and a few that none allows.
    return [
        "display_name",
        "description",
        "min_match_threshold",
        "production",
        "metadata",
        "face_retention",
        "settings",
        "sources",
        "name",
        "dimension",
        "*",
        "settings.min_similarity",
    ]
