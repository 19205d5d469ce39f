"""TFRecord output: the hand-written encoder and reader checked against protobuf itself, against the
``tfrecord`` package (an independent CRC-32C and reader), and through ``download()``."""

from __future__ import annotations

import datetime
import io
import math
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import fsspec
import pyarrow.parquet as pq
import pytest
from conftest import BAD_IMAGES, GOOD_IMAGES, write_url_file
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import Message
from imageserver import ImageServer
from test_writers import INPUT, samples, write
from tfrecord.reader import example_loader
from tfrecord.writer import TFRecordWriter as ReferenceWriter

from img2ds_dagster import download
from img2ds_dagster.engine.settings import OutputSettings
from img2ds_dagster.engine.tfrecord import (
    BytesList,
    Feature,
    FloatList,
    Int64List,
    TFRecordError,
    TFRecordStream,
    crc32c,
    decode_example,
    encode_example,
    masked_crc32c,
    read_tfrecord,
    to_feature,
    to_features,
)
from img2ds_dagster.engine.writers import ShardTarget, metadata_schema, open_writer


def f32(value: float) -> float:
    return float(struct.unpack("<f", struct.pack("<f", value))[0])


FEATURES: dict[str, Feature] = {
    "key": BytesList([b"000000001"]),
    "jpg": BytesList([bytes(range(256)) * 130]),  # over 2**14 bytes: a three-byte length varint
    "captions": BytesList([b"", "é ✓".encode(), b"\x00\xff"]),
    "width": Int64List([256]),
    "ints": Int64List([0, 1, -1, 127, 128, 300, -(2**63), 2**63 - 1, True]),
    "floats": FloatList([0.0, -0.0, 0.5, -2.25, 1.0e30, 3.4e38, math.inf, -math.inf]),
    "clamped": FloatList([1e40, -1e40]),  # beyond float32: protobuf stores infinities
    "empty_bytes": BytesList([]),
    "empty_floats": FloatList([]),
    "empty_ints": Int64List([]),
    "ünïcode name": BytesList([b"x"]),
    "": BytesList([b"empty name"]),
}


def expected(feature: Feature) -> list[Any]:
    if isinstance(feature, FloatList):
        return [math.copysign(math.inf, v) if abs(v) > 3.5e38 else f32(v) for v in feature.value]
    if isinstance(feature, Int64List):
        return [int(v) for v in feature.value]
    return list(feature.value)


# --- an independent encoder: protobuf, with tf.train.Example's messages built at run time -----------


def example_proto() -> descriptor_pb2.FileDescriptorProto:
    """tensorflow/core/example/{example,feature}.proto, as a descriptor built here."""
    field = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(
        name="img2ds_tests/example.proto", package="tensorflow", syntax="proto3"
    )

    def message(container: Any, name: str, fields: list[tuple[str, int, str]], repeated: bool = False) -> Any:
        msg = container.add(name=name)
        for number, (fname, ftype, type_name) in enumerate(fields, 1):
            label = field.LABEL_REPEATED if repeated else field.LABEL_OPTIONAL
            f = msg.field.add(name=fname, number=number, label=label, type=ftype)
            if type_name:
                f.type_name = type_name
        return msg

    for kind, ftype in (
        ("Bytes", field.TYPE_BYTES),
        ("Float", field.TYPE_FLOAT),
        ("Int64", field.TYPE_INT64),
    ):
        message(proto.message_type, f"{kind}List", [("value", ftype, "")], repeated=True)
    kinds = [
        (f"{k.lower()}_list", field.TYPE_MESSAGE, f".tensorflow.{k}List") for k in ("Bytes", "Float", "Int64")
    ]
    feature = message(proto.message_type, "Feature", kinds)
    feature.oneof_decl.add(name="kind")
    for f in feature.field:
        f.oneof_index = 0
    entry_type = ".tensorflow.Features.FeatureEntry"
    features = message(proto.message_type, "Features", [("feature", field.TYPE_MESSAGE, entry_type)], True)
    entry = [("key", field.TYPE_STRING, ""), ("value", field.TYPE_MESSAGE, ".tensorflow.Feature")]
    message(features.nested_type, "FeatureEntry", entry).options.map_entry = True
    message(proto.message_type, "Example", [("features", field.TYPE_MESSAGE, ".tensorflow.Features")])
    return proto


def example_class(proto: descriptor_pb2.FileDescriptorProto) -> type[Message]:
    # A private pool: the tfrecord package registers its own copy of these names in the default one.
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tensorflow.Example"))


EXAMPLE = example_class(example_proto())


def protobuf_example(features: dict[str, Feature]) -> Any:
    kinds = {BytesList: "bytes_list", FloatList: "float_list", Int64List: "int64_list"}
    msg: Any = EXAMPLE()
    for name, feature in features.items():
        values = getattr(msg.features.feature[name], kinds[type(feature)])
        values.SetInParent()  # an empty list is still a list of that kind
        # protobuf 6.33 deprecates bools in int64 fields (img2dataset stores bool columns that way).
        values.value.extend(map(int, feature.value) if isinstance(feature, Int64List) else feature.value)
    return msg


def protobuf_values(msg: Any) -> dict[str, list[Any]]:
    out = {}
    for name, feature in msg.features.feature.items():
        kind = feature.WhichOneof("kind")
        out[name] = list(getattr(feature, kind).value) if kind else []
    return out


def test_encoder_writes_what_protobuf_writes() -> None:
    ours = encode_example(FEATURES)
    parsed = EXAMPLE.FromString(ours)
    assert parsed == protobuf_example(FEATURES)
    assert protobuf_values(parsed) == {name: expected(f) for name, f in FEATURES.items()}
    for name, feature in FEATURES.items():  # one feature: no map order to differ
        assert encode_example({name: feature}) == protobuf_example({name: feature}).SerializeToString()
    # Entries in UTF-8 byte order of their names, as C++ protobuf's deterministic serialization orders
    # them (upb, protobuf's default Python backend, orders string keys otherwise).
    names = list(decode_example(ours))
    assert names == sorted(FEATURES, key=str.encode)


def test_encoder_output_is_protobufs_deterministic_serialization() -> None:
    """protobuf's pure-Python backend, parsing our bytes and serializing them deterministically, gives
    back the same bytes (the backend is chosen at import, hence the subprocess)."""
    script = (
        "import sys\n"
        "from google.protobuf import descriptor_pb2, descriptor_pool, message_factory\n"
        "from google.protobuf.internal import api_implementation\n"
        "assert api_implementation.Type() == 'python'\n"
        "pool = descriptor_pool.DescriptorPool()\n"
        "pool.Add(descriptor_pb2.FileDescriptorProto.FromString(bytes.fromhex(sys.argv[1])))\n"
        "cls = message_factory.GetMessageClass(pool.FindMessageTypeByName('tensorflow.Example'))\n"
        "sys.stdout.buffer.write(cls.FromString(sys.stdin.buffer.read()).SerializeToString(deterministic=True))\n"
    )
    ours = encode_example(FEATURES)
    done = subprocess.run(
        [sys.executable, "-c", script, example_proto().SerializeToString().hex()],
        input=ours,
        capture_output=True,
        check=True,
        env={**os.environ, "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION": "python"},
    )
    assert done.stdout == ours


def test_decoder_reads_what_protobuf_writes() -> None:
    assert decode_example(protobuf_example(FEATURES).SerializeToString()) == {
        name: expected(f) for name, f in FEATURES.items()
    }
    # Unpacked repeated scalars are valid too: a parser must accept them.
    unpacked_ints = b"\x1a\x06" + b"\x08\x05" + b"\x08\x7f" + b"\x08\x01"
    unpacked_floats = b"\x12\x0a" + b"\x0d" + struct.pack("<f", 0.5) + b"\x0d" + struct.pack("<f", 2.0)
    entries = b""
    for name, feature in ((b"i", unpacked_ints), (b"f", unpacked_floats)):
        entry = b"\x0a" + bytes([len(name)]) + name + b"\x12" + bytes([len(feature)]) + feature
        entries += b"\x0a" + bytes([len(entry)]) + entry
    data = b"\x0a" + bytes([len(entries)]) + entries
    assert protobuf_values(EXAMPLE.FromString(data)) == {"i": [5, 127, 1], "f": [0.5, 2.0]}
    assert decode_example(data) == {"i": [5, 127, 1], "f": [0.5, 2.0]}


def test_round_trip_through_a_file() -> None:
    buffer = io.BytesIO()
    stream = TFRecordStream(buffer)
    records = [FEATURES, {"key": BytesList([b"2"])}, {}]
    for features in records:
        stream.write(encode_example(features))
    assert stream.size == len(buffer.getvalue())
    buffer.seek(0)
    assert list(read_tfrecord(buffer)) == [{n: expected(f) for n, f in r.items()} for r in records]


# --- CRC-32C and the record framing -------------------------------------------------------------------


def test_crc32c_known_values() -> None:
    assert crc32c(b"123456789") == 0xE3069283
    # RFC 3720 (iSCSI), appendix B.4.
    assert crc32c(bytes(32)) == 0x8A9136AA
    assert crc32c(b"\xff" * 32) == 0x62A8AB43
    assert crc32c(bytes(range(32))) == 0x46DD794E
    assert crc32c(bytes(range(31, -1, -1))) == 0x113FDB5C
    for data in (b"", b"123456789", bytes(range(256)) * 100):
        assert struct.pack("<I", masked_crc32c(data)) == ReferenceWriter.masked_crc(data)


def test_framing_is_the_tfrecord_packages(tmp_path: Path) -> None:
    reference = ReferenceWriter(str(tmp_path / "theirs.tfrecord"))
    ours = io.BytesIO()
    stream = TFRecordStream(ours)
    for i in range(3):  # one feature per record: protobuf's map order cannot differ from ours
        reference.write({"jpg": (b"image %d" % i * 1000 * i, "byte")})
        stream.write(encode_example({"jpg": BytesList([b"image %d" % i * 1000 * i])}))
    reference.close()
    assert (tmp_path / "theirs.tfrecord").read_bytes() == ours.getvalue()


def test_damaged_files_raise_clear_errors() -> None:
    buffer = io.BytesIO()
    stream = TFRecordStream(buffer)
    for i in range(2):
        stream.write(encode_example({"key": BytesList([b"%d" % i]), "jpg": BytesList([b"x" * 100])}))
    data = buffer.getvalue()
    first = len(data) // 2

    def read(damaged: bytes) -> list[dict[str, Any]]:
        return list(read_tfrecord(io.BytesIO(damaged)))

    assert len(read(data)) == 2
    with pytest.raises(TFRecordError, match=f"truncated record header at byte {first}"):
        read(data[: first + 5])
    with pytest.raises(TFRecordError, match=f"truncated record at byte {first}"):
        read(data[:-1])
    flipped_length = bytearray(data)
    flipped_length[first] ^= 1
    with pytest.raises(TFRecordError, match=f"corrupt record length at byte {first}"):
        read(bytes(flipped_length))
    flipped_data = bytearray(data)
    flipped_data[first + 40] ^= 1
    with pytest.raises(TFRecordError, match=f"corrupt record data at byte {first}"):
        read(bytes(flipped_data))
    with pytest.raises(
        TFRecordError, match=r"not a valid tf\.train\.Example: a protobuf field runs past the end"
    ):
        decode_example(b"\x0a\x05\x0a\x03")  # a length that runs past the end


# --- img2dataset's rules for metadata values ------------------------------------------------------


def test_metadata_values_follow_img2datasets_rules() -> None:
    assert to_feature(256) == Int64List([256])
    assert encode_example({"b": to_feature(True)}) == encode_example({"b": Int64List([1])})
    assert to_feature(0.5) == FloatList([0.5])
    assert to_feature(None) == BytesList([b""])
    assert to_feature("héllo") == BytesList(["héllo".encode()])
    assert to_feature(b"\x00") == BytesList([b"\x00"])
    assert to_feature([1, 2]) == Int64List([1, 2])
    assert to_feature([0.5, 1]) == FloatList([0.5, 1])
    assert to_feature(["a", None, b"c"]) == BytesList([b"a", b"", b"c"])
    assert to_feature([None, "b"]) == BytesList([b"", b"b"])
    assert to_feature([]) == BytesList([])  # img2dataset raises IndexError here
    with pytest.raises(TypeError, match="dict cannot be stored"):
        to_feature({"a": 1})
    # What the rules cannot store goes in as text (a date, a struct, mixed lists, huge ints), so that
    # one odd column never fails a shard.
    odd = {"ok": 1, "struct": {"a": 1}, "mixed": [1, 2.5], "big": 2**63, "day": datetime.date(2024, 5, 1)}
    assert to_features(odd) == {
        "ok": Int64List([1]),
        "struct": BytesList([b"{'a': 1}"]),
        "mixed": BytesList([b"[1, 2.5]"]),
        "big": BytesList([b"9223372036854775808"]),
        "day": BytesList([b"2024-05-01"]),
    }
    assert decode_example(encode_example(to_features(odd)))["day"] == [b"2024-05-01"]


# --- the shard writer ------------------------------------------------------------------------------


def test_writer_round_trip(tmp_path: Path) -> None:
    size = write("tfrecord", tmp_path)
    records = list(read_tfrecord(tmp_path / "00000.tfrecord"))
    assert [r["key"] for r in records] == [[b"00000"], [b"00001"], [b"00003"]]  # successes only
    first = records[0]
    assert list(first) == sorted(["jpg", "txt", *metadata_schema(INPUT, OutputSettings()).names])
    assert first["jpg"] == [b"jpeg bytes 0"]
    assert first["txt"] == first["caption"] == [b"a photo 0"]
    assert first["width"] == [256]
    assert first["error_message"] == [b""]  # None
    assert first["status"] == [b"success"]
    table = pq.read_table(tmp_path / "00000.parquet")
    assert table.column("key").to_pylist() == ["00000", "00001", "00002", "00003"]
    assert table.schema == metadata_schema(INPUT, OutputSettings())
    assert size == (tmp_path / "00000.tfrecord").stat().st_size + (tmp_path / "00000.parquet").stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000.parquet", "00000.tfrecord"]


def test_the_tfrecord_package_reads_the_writers_file(tmp_path: Path) -> None:
    write("tfrecord", tmp_path)
    records = list(example_loader(str(tmp_path / "00000.tfrecord"), None))
    assert [r["key"] for r in records] == [b"00000", b"00001", b"00003"]
    assert records[1]["jpg"] == b"jpeg bytes 1"
    assert records[1]["txt"] == b"a photo 1"
    assert records[1]["original_width"].tolist() == [640]


def test_writer_without_captions_has_no_txt(tmp_path: Path) -> None:
    write("tfrecord", tmp_path, save_caption=False)
    records = list(read_tfrecord(tmp_path / "00000.tfrecord"))
    assert "txt" not in records[0]
    assert records[0]["caption"] == [b"a photo 0"]  # still there, as a metadata column


def test_writer_output_is_reproducible(tmp_path: Path) -> None:
    write("tfrecord", tmp_path / "a")
    write("tfrecord", tmp_path / "b")
    assert (tmp_path / "a" / "00000.tfrecord").read_bytes() == (
        tmp_path / "b" / "00000.tfrecord"
    ).read_bytes()


def test_writer_on_an_fsspec_filesystem() -> None:
    folder = "memory://img2ds-tfrecord-test/out"
    shard = ShardTarget(folder, "00007", metadata_schema(INPUT, OutputSettings()), "webp", True)
    try:
        with open_writer("tfrecord", shard) as writer:
            for sample in samples():
                writer.write(sample)
            writer.commit()
        assert [r["key"] for r in read_tfrecord(f"{folder}/00007.tfrecord")] == [
            [b"00000"],
            [b"00001"],
            [b"00003"],
        ]
        assert next(read_tfrecord(f"{folder}/00007.tfrecord"))["webp"] == [b"jpeg bytes 0"]
    finally:
        fsspec.filesystem("memory").rm("/img2ds-tfrecord-test", recursive=True)


# --- end to end --------------------------------------------------------------------------------


def test_download_writes_tfrecord_shards(server: ImageServer, tmp_path: Path) -> None:
    paths = [*GOOD_IMAGES, *BAD_IMAGES]
    url_list = write_url_file(
        tmp_path / "urls.parquet",
        [server.url(p) for p in paths],
        captions=[f"caption {i}" for i in range(len(paths))],
        extra={"score": [i / 4 for i in range(len(paths))], "rank": list(range(len(paths)))},
    )
    out = tmp_path / "out"
    report = download(
        url_list=str(url_list),
        input_format="parquet",
        caption_col="caption",
        save_additional_columns=["score", "rank"],
        output_folder=str(out),
        output_format="tfrecord",
        number_sample_per_shard=100,
        thread_count=8,
        timeout=2,
    )
    assert report.totals["successes"] == len(GOOD_IMAGES)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "00000.parquet",
        "00000.tfrecord",
        "00000_stats.json",
    ]
    rows = pq.read_table(out / "00000.parquet").to_pylist()
    assert len(rows) == len(paths)
    records = list(read_tfrecord(out / "00000.tfrecord"))
    successes = [r for r in rows if r["status"] == "success"]
    assert [r["key"] for r in records] == [[r["key"].encode()] for r in successes]
    for record, row in zip(records, successes, strict=True):
        assert record["jpg"][0][:2] == b"\xff\xd8"  # a JPEG
        assert record["txt"] == [row["caption"].encode()]
        assert record["width"] == [row["width"]]
        assert record["rank"] == [row["rank"]]
        assert record["score"] == [f32(row["score"])]
        assert record["sha256"] == [row["sha256"].encode()]
        assert record["error_message"] == [b""]
