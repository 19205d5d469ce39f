"""TFRecord files of ``tf.train.Example`` records, written and read without TensorFlow.

A record is framed as TensorFlow frames it: the length (uint64 little-endian), the masked CRC-32C of
those 8 bytes, the data, the masked CRC-32C of the data. The Example protobuf is encoded by hand (it
is a few nested length-prefixed messages); features go in key order, so the bytes are those of
protobuf's deterministic serialization and the same sample always gives the same record.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any

import fsspec
import google_crc32c

from ..errors import Img2dsError

_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_F32 = struct.Struct("<f")
_CRC_MASK = 0xA282EAD8
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1

# Wire tags: field number << 3 | wire type 2 ("length-delimited"), the only wire type written.
_TAG_1 = b"\x0a"  # Example.features, Features.feature, the entry's key, Feature.bytes_list, *List.value
_TAG_2 = b"\x12"  # the map entry's value, Feature.float_list
_TAG_3 = b"\x1a"  # Feature.int64_list

FeatureValues = list[bytes] | list[float] | list[int]


class TFRecordError(Img2dsError, ValueError):
    """A TFRecord file is truncated or corrupt, or a record is not a valid tf.train.Example."""


@dataclass(frozen=True, slots=True)
class BytesList:
    value: Sequence[bytes]


@dataclass(frozen=True, slots=True)
class FloatList:
    value: Sequence[float]  # stored as float32, as TensorFlow does


@dataclass(frozen=True, slots=True)
class Int64List:
    value: Sequence[int]


Feature = BytesList | FloatList | Int64List


def crc32c(data: bytes | memoryview) -> int:
    return int(google_crc32c.value(data))


def masked_crc32c(data: bytes | memoryview) -> int:
    """TensorFlow's masked CRC: a CRC stored next to the data it covers is rotated and offset, so that
    a CRC of bytes that contain CRCs stays well distributed."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + _CRC_MASK) & 0xFFFFFFFF


# --- img2dataset's feature rules ---------------------------------------------------------------


def to_features(meta: Mapping[str, Any]) -> dict[str, Feature]:
    """Each metadata column as a feature, by img2dataset's ``TFRecordSampleWriter._feature`` rules.

    A value those rules cannot store (a list mixing ints and floats, an int over 64 bits, a struct)
    is stored as its text, as the sample's .json sidecar has it: img2dataset would fail the whole
    shard on it, and a retry would fail the same way."""
    features = {}
    for name, value in meta.items():
        try:
            feature = to_feature(value)
            _feature(feature)  # raises now what encoding the example would raise later
        except (TypeError, ValueError):
            feature = BytesList([str(value).encode()])
        features[name] = feature
    return features


def to_feature(value: Any) -> Feature:
    """A list by its first item's type; int (and bool) -> int64; float -> float; None -> b""; str ->
    UTF-8 bytes; bytes as is. Other types are refused, as TensorFlow refuses them.

    img2dataset fails on an empty list (it looks at ``value[0]``); here it is an empty bytes list, the
    kind img2dataset gives any list whose first item is not a number.
    """
    if isinstance(value, list):
        if value and isinstance(value[0], int):
            return Int64List(value)
        if value and isinstance(value[0], float):
            return FloatList(value)
        return BytesList([_bytes(v) for v in value])
    if isinstance(value, int):
        return Int64List([value])
    if isinstance(value, float):
        return FloatList([value])
    return BytesList([_bytes(value)])


def _bytes(value: Any) -> bytes:
    if value is None:
        return b""
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, bytes):
        return value
    raise TypeError(f"a {type(value).__name__} cannot be stored in a tf.train.Example bytes list")


# --- encoding ----------------------------------------------------------------------------------


def encode_example(features: Mapping[str, Feature]) -> bytes:
    """A serialized ``tf.train.Example``, features in key order."""
    entries: list[bytes] = []
    for name in sorted(features):
        key = name.encode()
        entry = [_TAG_1, _varint(len(key)), key, *_delimited(_TAG_2, _feature(features[name]))]
        entries += _delimited(_TAG_1, entry)
    return b"".join(_delimited(_TAG_1, entries))


def _feature(feature: Feature) -> list[bytes]:
    # The parts are joined once, at the end, so a 30 KB image is copied once, not once per level.
    if isinstance(feature, BytesList):
        parts: list[bytes] = []
        for v in feature.value:
            parts += (_TAG_1, _varint(len(v)), v)
        return _delimited(_TAG_1, parts)
    if isinstance(feature, FloatList):
        return _delimited(_TAG_2, _packed(_floats(feature.value)))
    return _delimited(
        _TAG_3, _packed(b"".join(_varint(_int64(v) & 0xFFFFFFFFFFFFFFFF) for v in feature.value))
    )


def _floats(values: Sequence[float]) -> bytes:
    try:
        return struct.pack(f"<{len(values)}f", *values)
    except OverflowError:
        return b"".join(map(_float32, values))
    except struct.error as e:
        raise TypeError(f"a float list holds a value that is not a number: {e}") from e


def _float32(value: float) -> bytes:
    try:
        return _F32.pack(value)
    except OverflowError:  # beyond float32's range: protobuf stores infinity, struct refuses
        return _F32.pack(math.copysign(math.inf, value))


def _int64(value: int) -> int:
    if not isinstance(value, int):
        raise TypeError(f"a {type(value).__name__} in an int64 list")
    if not _INT64_MIN <= value <= _INT64_MAX:
        raise ValueError(f"{value} is out of the int64 range")
    return value


def _packed(payload: bytes) -> list[bytes]:
    # Packed repeated scalars, as proto3 writes them; an empty list is no field at all.
    return [_TAG_1, _varint(len(payload)), payload] if payload else []


def _delimited(tag: bytes, parts: list[bytes]) -> list[bytes]:
    return [tag, _varint(sum(map(len, parts))), *parts]


_ONE_BYTE_VARINTS = [bytes((n,)) for n in range(0x80)]  # most lengths and metadata ints


def _varint(n: int) -> bytes:
    if n < 0x80:
        return _ONE_BYTE_VARINTS[n]
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


class TFRecordStream:
    """Writes framed records to a binary file; ``size`` counts the bytes written."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.size = 0

    def write(self, record: bytes) -> None:
        length = _U64.pack(len(record))
        self.raw.write(length + _U32.pack(masked_crc32c(length)))
        self.raw.write(record)
        self.raw.write(_U32.pack(masked_crc32c(record)))
        self.size += len(record) + 16


# --- reading -----------------------------------------------------------------------------------


def read_tfrecord(source: str | os.PathLike[str] | IO[bytes]) -> Iterator[dict[str, FeatureValues]]:
    """The Examples of a TFRecord file (a path, an fsspec URL or an open binary file), each as a dict
    from feature name to its list of values. CRCs are checked; damage raises TFRecordError."""
    for record in read_records(source):
        yield decode_example(record)


def read_records(source: str | os.PathLike[str] | IO[bytes]) -> Iterator[bytes]:
    """The records of a TFRecord file, their CRCs checked."""
    if isinstance(source, str | os.PathLike):
        with fsspec.open(os.fspath(source), "rb") as f:
            yield from read_records(f)
        return
    offset = 0
    while header := source.read(12):
        if len(header) < 12:
            raise TFRecordError(f"truncated record header at byte {offset}")
        (length,) = _U64.unpack_from(header)
        if _U32.unpack_from(header, 8)[0] != masked_crc32c(header[:8]):
            raise TFRecordError(f"corrupt record length at byte {offset} (CRC mismatch)")
        data = source.read(length)
        crc = source.read(4)
        if len(data) < length or len(crc) < 4:
            raise TFRecordError(f"truncated record at byte {offset}: expected {length} bytes of data")
        if _U32.unpack(crc)[0] != masked_crc32c(data):
            raise TFRecordError(f"corrupt record data at byte {offset} (CRC mismatch)")
        yield data
        offset += length + 16


def decode_example(data: bytes) -> dict[str, FeatureValues]:
    """A serialized ``tf.train.Example`` as {name: values}, in the order the features were written."""
    features: dict[str, FeatureValues] = {}
    try:
        for number, payload in _fields(memoryview(data)):
            if number == 1 and isinstance(payload, memoryview):  # Example.features
                for entry_number, entry in _fields(payload):
                    if entry_number == 1 and isinstance(entry, memoryview):
                        name, values = _map_entry(entry)
                        features[name] = values
    except (IndexError, ValueError, struct.error) as e:  # a read past the end, bad UTF-8, a bad length
        raise TFRecordError(f"not a valid tf.train.Example: {e}") from e
    return features


def _map_entry(entry: memoryview) -> tuple[str, FeatureValues]:
    # protobuf's defaults, for a field left out
    name = ""
    values: FeatureValues = []
    for number, payload in _fields(entry):
        if number == 1 and isinstance(payload, memoryview):
            name = str(payload, "utf-8")
        elif number == 2 and isinstance(payload, memoryview):
            values = _feature_values(payload)
    return name, values


def _feature_values(feature: memoryview) -> FeatureValues:
    values: FeatureValues = []  # a Feature with no kind set
    for kind, payload in _fields(feature):
        if not isinstance(payload, memoryview):
            continue
        items = [v for n, v in _fields(payload) if n == 1]  # BytesList/FloatList/Int64List.value
        if kind == 1:
            values = [bytes(v) for v in items if isinstance(v, memoryview)]
        elif kind == 2:
            # Packed (what writers emit) or one fixed32 field per value (what parsers must accept).
            values = [f for v in items if isinstance(v, memoryview) for (f,) in _F32.iter_unpack(v)]
        elif kind == 3:
            ints: list[int] = []
            for v in items:
                ints += _varints(v) if isinstance(v, memoryview) else [v]
            values = [v - (1 << 64) if v > _INT64_MAX else v for v in ints]
    return values


def _fields(buf: memoryview) -> Iterator[tuple[int, int | memoryview]]:
    """(field number, value) pairs: an int for varints, the raw bytes for every other wire type."""
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        wire_type = key & 7
        if wire_type == 0:
            value, pos = _read_varint(buf, pos)
            yield key >> 3, value
            continue
        if wire_type == 2:
            size, pos = _read_varint(buf, pos)
        elif wire_type in (1, 5):
            size = 8 if wire_type == 1 else 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire_type}")
        if pos + size > len(buf):
            raise ValueError("a protobuf field runs past the end of its message")
        yield key >> 3, buf[pos : pos + size]
        pos += size


def _varints(buf: memoryview) -> list[int]:
    out, pos = [], 0
    while pos < len(buf):
        value, pos = _read_varint(buf, pos)
        out.append(value)
    return out


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        result |= (byte & 0x7F) << shift
        pos += 1
        if byte < 0x80:
            return result, pos
        shift += 7
