"""Shard writers: one class per output format behind one protocol, and a registry of them.

Every writer receives the shard's samples in key order and makes its files appear atomically on
``commit()``. All of them (but ``dummy``) also write the shard's metadata parquet, one row per input
row, with img2dataset's columns. Tar members carry a fixed mtime and owner, so the same input gives
byte-identical shards.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any, Protocol

import pyarrow as pa
import pyarrow.parquet as pq

from .settings import OutputSettings
from .storage import AtomicFile, atomic_file, atomic_folder, join
from .tfrecord import BytesList, Feature, TFRecordStream, encode_example, to_features

TAR_MTIME = 0  # reproducible tars; webdataset's TarWriter stamps the current time
TAR_OWNER = "bigdata"  # webdataset's default owner, kept so tars look like img2dataset's

SAMPLE_COLUMNS: list[tuple[str, pa.DataType]] = [
    ("key", pa.string()),
    ("status", pa.string()),
    ("error_message", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("original_width", pa.int32()),
    ("original_height", pa.int32()),
]
# resize_mode="bucket" adds the bucket each image went to (set for failed_to_resize rows too: the
# bucket that would have needed upsampling).
BUCKET_COLUMNS: list[tuple[str, pa.DataType]] = [
    ("bucket_id", pa.string()),
    ("target_width", pa.int32()),
    ("target_height", pa.int32()),
]


def metadata_schema(input_schema: pa.Schema, output: OutputSettings, bucketed: bool = False) -> pa.Schema:
    """img2dataset's metadata columns: the input columns, then the sample columns (and the bucket
    columns when ``bucketed``), exif and hash."""
    fields = [*input_schema, *(pa.field(n, t) for n, t in SAMPLE_COLUMNS)]
    if bucketed:
        fields += [pa.field(n, t) for n, t in BUCKET_COLUMNS]
    if output.extract_exif:
        fields.append(pa.field("exif", pa.string()))
    if output.compute_hash is not None and output.compute_hash not in input_schema.names:
        fields.append(pa.field(output.compute_hash, pa.string()))
    return pa.schema(fields)


@dataclass(slots=True)
class Sample:
    """One input row's outcome, as writers see it."""

    key: str
    meta: dict[str, Any]  # the metadata row, in schema order
    image: bytes | None  # the encoded image, for successful samples only
    caption: str | None  # the caption text when captions are saved


@dataclass(frozen=True, slots=True)
class ShardTarget:
    """Where a shard goes and what its rows look like."""

    folder: str
    name: str
    schema: pa.Schema
    encode_format: str
    save_caption: bool
    spool_dir: str | None = None  # where files for an object store wait for their upload

    @property
    def parquet_path(self) -> str:
        return join(self.folder, f"{self.name}.parquet")


class ShardWriter(Protocol):
    """Receives a shard's samples in key order; files appear only on ``commit()``."""

    def write(self, sample: Sample) -> None: ...

    def commit(self) -> int:
        """Make the shard's files visible; returns the number of bytes written."""
        ...

    def abort(self) -> None: ...


def sample_json(meta: dict[str, Any]) -> bytes:
    return json.dumps(meta, indent=4, default=str).encode()


def caption_text(caption: Any) -> bytes:
    return ("" if caption is None else str(caption)).encode()


class _CountingFile:
    """Counts bytes written through it (tarfile and parquet write to file-like objects)."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.size = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self.size += len(data)
        return self.raw.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw, name)


class UstarStream:
    """A tar stream of regular files, byte for byte what ``tarfile`` writes in USTAR format for the
    same members (mode 0444, owner "bigdata", mtime 0), several times faster: the header is a fixed
    template with the name, size and checksum filled in."""

    BLOCK = 512
    RECORD = 20 * 512  # tarfile pads the archive to whole records

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.size = 0
        template = bytearray(self.BLOCK)
        template[100:124] = b"0000444\x000000000\x000000000\x00"  # mode, uid, gid
        template[136:148] = b"%011o\x00" % TAR_MTIME
        template[156:157] = b"0"  # a regular file
        template[257:265] = b"ustar\x0000"
        owner = TAR_OWNER.encode()
        template[265 : 265 + len(owner)] = owner
        template[297 : 297 + len(owner)] = owner
        self._template = bytes(template)

    def add(self, name: str, data: bytes) -> None:
        encoded = name.encode()
        if len(encoded) > 100:
            raise ValueError(f"tar member name over 100 bytes: {name!r}")
        header = bytearray(self._template)
        header[: len(encoded)] = encoded
        header[124:136] = b"%011o\x00" % len(data)
        header[148:156] = b"        "  # the checksum is computed with its own field as spaces
        header[148:156] = b"%06o\x00 " % sum(header)
        padding = -len(data) % self.BLOCK
        self._write(bytes(header))
        self._write(data)
        if padding:
            self._write(bytes(padding))

    def close(self) -> None:
        end = 2 * self.BLOCK
        self._write(bytes(end + (-(self.size + end) % self.RECORD)))

    def _write(self, data: bytes) -> None:
        self.raw.write(data)
        self.size += len(data)


class MetadataTable:
    """The shard's metadata parquet, written in one go when the shard is complete (a shard's rows are
    small)."""

    def __init__(self, target: ShardTarget, extra: pa.Schema | None = None) -> None:
        self.target = target
        self.schema = target.schema if extra is None else pa.schema([*target.schema, *extra])
        self.rows: list[dict[str, Any]] = []

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)

    def written(self) -> tuple[AtomicFile, int]:
        """The parquet, written but not yet in place (the caller commits it), and its size."""
        table = pa.Table.from_pylist(self.rows, schema=self.schema)
        pending = atomic_file(self.target.parquet_path, self.target.spool_dir)
        try:
            f = _CountingFile(pending.file)
            pq.write_table(table, f)
        except BaseException:
            pending.abort()
            raise
        return pending, f.size


class _Committable(Protocol):
    def commit(self) -> None: ...

    def abort(self) -> None: ...


def commit_in_order(*parts: _Committable) -> None:
    """Commit each part in turn; if one fails, the ones after it are aborted. The parts are written
    in full before this is called, so what can fail here is only the renames or uploads."""
    for index, part in enumerate(parts):
        try:
            part.commit()
        except BaseException:
            for later in parts[index + 1 :]:
                later.abort()
            raise


class _OneFileWriter:
    """A shard made of one data file, ``<name>.<suffix>``, holding the successful samples, plus the
    parquet; the data file appears on ``commit()`` (see ``storage.AtomicFile``)."""

    suffix: str

    def __init__(self, target: ShardTarget) -> None:
        self.target = target
        self.metadata = MetadataTable(target)
        self._file = atomic_file(join(target.folder, f"{target.name}.{self.suffix}"), target.spool_dir)

    def write(self, sample: Sample) -> None:
        self.metadata.add(sample.meta)
        if sample.image is not None:
            self._write_image(sample, sample.image)

    def _write_image(self, sample: Sample, image: bytes) -> None:
        raise NotImplementedError

    def _finish(self) -> int:
        """Ends the data file; returns its size in bytes."""
        raise NotImplementedError

    def commit(self) -> int:
        size = self._finish()
        parquet, parquet_size = self.metadata.written()
        commit_in_order(self._file, parquet)
        return size + parquet_size

    def abort(self) -> None:
        self._file.abort()


class WebDatasetWriter(_OneFileWriter):
    """``<name>.tar`` with ``<key>.<ext>``, ``<key>.json`` and ``<key>.txt`` members, plus the parquet."""

    suffix = "tar"

    def __init__(self, target: ShardTarget) -> None:
        super().__init__(target)
        self._tar = UstarStream(self._file.file)

    def _write_image(self, sample: Sample, image: bytes) -> None:
        members = {self.target.encode_format: image, "json": sample_json(sample.meta)}
        if self.target.save_caption:
            members["txt"] = caption_text(sample.caption)
        for ext in sorted(members):  # webdataset's member order
            self._tar.add(f"{sample.key}.{ext}", members[ext])

    def _finish(self) -> int:
        self._tar.close()
        return self._tar.size


class FilesWriter:
    """A ``<name>/`` folder of ``<key>.<ext>``, ``<key>.json`` and ``<key>.txt`` files, plus the parquet."""

    def __init__(self, target: ShardTarget) -> None:
        self.target = target
        self.metadata = MetadataTable(target)
        self.folder = atomic_folder(join(target.folder, target.name))
        self._size = 0

    def write(self, sample: Sample) -> None:
        self.metadata.add(sample.meta)
        if sample.image is None:
            return
        self._put(f"{sample.key}.{self.target.encode_format}", sample.image)
        if self.target.save_caption:
            self._put(f"{sample.key}.txt", caption_text(sample.caption))
        self._put(f"{sample.key}.json", sample_json(sample.meta))

    def _put(self, name: str, data: bytes) -> None:
        self.folder.write(name, data)
        self._size += len(data)

    def commit(self) -> int:
        parquet, parquet_size = self.metadata.written()
        commit_in_order(self.folder, parquet)
        return self._size + parquet_size

    def abort(self) -> None:
        self.folder.abort()


class ParquetWriter:
    """``<name>.parquet`` holding the metadata columns plus the image bytes in a ``<ext>`` column."""

    def __init__(self, target: ShardTarget) -> None:
        self.metadata = MetadataTable(target, pa.schema([pa.field(target.encode_format, pa.binary())]))
        self._column = target.encode_format

    def write(self, sample: Sample) -> None:
        self.metadata.add({**sample.meta, self._column: sample.image})

    def commit(self) -> int:
        parquet, size = self.metadata.written()
        parquet.commit()
        return size

    def abort(self) -> None:
        pass


class TFRecordWriter(_OneFileWriter):
    """``<name>.tfrecord`` with one tf.train.Example per successful sample, as img2dataset writes it:
    ``key``, ``<ext>`` (the image), ``txt`` when captions are saved, and every metadata column by
    img2dataset's type rules (see ``tfrecord.to_features``); plus the parquet."""

    suffix = "tfrecord"

    def __init__(self, target: ShardTarget) -> None:
        super().__init__(target)
        self._records = TFRecordStream(self._file.file)

    def _write_image(self, sample: Sample, image: bytes) -> None:
        features: dict[str, Feature] = {
            "key": BytesList([sample.key.encode()]),
            self.target.encode_format: BytesList([image]),
        }
        if self.target.save_caption:
            features["txt"] = BytesList([caption_text(sample.caption)])
        features.update(to_features(sample.meta))  # a column of the same name wins, as in img2dataset
        self._records.write(encode_example(features))

    def _finish(self) -> int:
        return self._records.size


class DummyWriter:
    """Writes nothing (img2dataset's benchmark format); only the stats file is written."""

    def __init__(self, target: ShardTarget) -> None:
        pass

    def write(self, sample: Sample) -> None:
        pass

    def commit(self) -> int:
        return 0

    def abort(self) -> None:
        pass


WRITERS: dict[str, Callable[[ShardTarget], ShardWriter]] = {
    "files": FilesWriter,
    "webdataset": WebDatasetWriter,
    "parquet": ParquetWriter,
    "tfrecord": TFRecordWriter,
    "dummy": DummyWriter,
}


@contextlib.contextmanager
def open_writer(output_format: str, target: ShardTarget) -> Iterator[ShardWriter]:
    """A writer whose output is removed if the ``with`` block fails (commit is the caller's job)."""
    writer = WRITERS[output_format](target)
    try:
        yield writer
    except BaseException:
        writer.abort()
        raise
