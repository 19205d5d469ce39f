"""Read URL tables (txt/csv/tsv/json/jsonl/parquet, optionally gzipped) from any fsspec location,
validate them, and stage them as one parquet file of input rows per shard plus a manifest.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import logging
import re
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO, Any, cast

import fsspec
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from ..errors import InputTableError, StagingMissingError
from .settings import DownloadSettings, shard_name
from .storage import absolute, join, local_path, read_json, write_bytes_atomic, write_json_atomic

log = logging.getLogger(__name__)

MANIFEST_NAME = "table.json"
# Threads writing shards: on an object store each write is a round trip, and 16 keep it busy; on a
# local disk 2 are as fast, and each thread holds its own compression and allocator memory: staging
# 10M rows peaked at 492 MB with 16 and 286 MB with 2 (benchmarks/staging_memory.py).
_STORE_WRITERS = 16
_LOCAL_WRITERS = 2


def _read_txt(f: IO[bytes]) -> pa.Table:
    # One URL per line. img2dataset parses txt as a one-column CSV, which splits URLs at commas and
    # quotes; reading lines keeps such URLs whole and is otherwise the same.
    lines = (line.strip() for line in f.read().decode("utf-8-sig").splitlines())
    return pa.table({"url": pa.array([line for line in lines if line], pa.string())})


def _read_csv(f: IO[bytes]) -> pa.Table:
    return pa_csv.read_csv(f)


def _read_tsv(f: IO[bytes]) -> pa.Table:
    return pa_csv.read_csv(f, parse_options=pa_csv.ParseOptions(delimiter="\t"))


def _read_json(f: IO[bytes]) -> pa.Table:
    # A JSON array of records, or an object of columns ({"url": [...]} or pandas' {"url": {"0": ...}}).
    data = json.load(f)
    if isinstance(data, list):
        return pa.Table.from_pylist(data)
    if isinstance(data, dict):
        return pa.table({k: list(v.values()) if isinstance(v, dict) else v for k, v in data.items()})
    raise ValueError("expected a JSON array of records or an object of columns")


def _read_jsonl(f: IO[bytes]) -> pa.Table:
    return pa_json.read_json(f)


def _read_parquet(f: IO[bytes]) -> pa.Table:
    return pq.read_table(f)


READERS: dict[str, Callable[[IO[bytes]], pa.Table]] = {
    "txt": _read_txt,
    "csv": _read_csv,
    "tsv": _read_tsv,
    "json": _read_json,
    "jsonl": _read_jsonl,
    "parquet": _read_parquet,
}
INPUT_FORMATS = tuple([*READERS, *(f"{name}.gz" for name in READERS if name != "parquet")])

# Staging reads a file this many rows at a time, so that its memory does not grow with the file.
BATCH_ROWS = 65_536
_BLOCK_BYTES = 8 << 20  # what pyarrow's CSV and JSON readers parse at a time


def _stream_txt(f: IO[bytes]) -> Iterator[pa.Table]:
    urls: list[str] = []
    text = io.TextIOWrapper(f, encoding="utf-8-sig")
    try:
        for line in text:
            url = line.strip()
            if url:
                urls.append(url)
            if len(urls) == BATCH_ROWS:
                yield pa.table({"url": pa.array(urls, pa.string())})
                urls = []
    finally:
        text.detach()  # the file is its opener's to close
    if urls:
        yield pa.table({"url": pa.array(urls, pa.string())})


def _stream_arrow(reader: Any) -> Iterator[pa.Table]:
    for batch in reader:
        yield pa.Table.from_batches([batch])


def _stream_csv(f: IO[bytes], delimiter: str = ",") -> Iterator[pa.Table]:
    read = pa_csv.ReadOptions(block_size=_BLOCK_BYTES)
    parse = pa_csv.ParseOptions(delimiter=delimiter)
    yield from _stream_arrow(pa_csv.open_csv(f, read_options=read, parse_options=parse))


def _stream_parquet(f: IO[bytes]) -> Iterator[pa.Table]:
    yield from _stream_arrow(pq.ParquetFile(f).iter_batches(batch_size=BATCH_ROWS))


# The formats staging reads by batches; a JSON array is parsed whole (json.load), as before.
STREAMS: dict[str, Callable[[IO[bytes]], Iterator[pa.Table]]] = {
    "txt": _stream_txt,
    "csv": _stream_csv,
    "tsv": lambda f: _stream_csv(f, "\t"),
    "jsonl": lambda f: _stream_arrow(
        pa_json.open_json(f, read_options=pa_json.ReadOptions(block_size=_BLOCK_BYTES))
    ),
    "parquet": _stream_parquet,
}


class _StreamBroken(Exception):
    """A batch after the first could not be read as the first ones were (a column whose type
    changes further down a CSV or JSON file): the file is read again, whole."""


def input_format_of(path: str) -> str | None:
    """The input format named by a file's extension (``a.csv.gz`` -> ``csv.gz``), or None."""
    name = path.rsplit("/", 1)[-1].lower()
    matches = [fmt for fmt in INPUT_FORMATS if name.endswith("." + fmt)]
    return max(matches, key=len) if matches else None


def table_key(path: str) -> str:
    """Partition key of a URL file: its name without the format extension, made key-safe."""
    name = path.rstrip("/").rsplit("/", 1)[-1]
    fmt = input_format_of(name)
    stem = name[: -len(fmt) - 1] if fmt else name.rsplit(".", 1)[0]
    # Letters and digits of any script stay (\w is Unicode-aware); anything else becomes "_".
    key = re.sub(r"[^\w.-]+", "_", stem).strip("._-")
    if not key:
        raise InputTableError(f"{path}: cannot make a table name from this file name")
    return key


def list_input_files(url_list: str, input_format: str) -> list[str]:
    """The URL files named by ``url_list``: the file itself, or a folder's ``*.<input_format>`` files."""
    fs, path = fsspec.core.url_to_fs(url_list)
    if fs.isdir(path):
        files = sorted(fs.glob(path.rstrip("/") + "/*." + input_format))
        if not files:
            raise InputTableError(f"{url_list}: no *.{input_format} file in this folder")
        return [fs.unstrip_protocol(f) if "://" in url_list else f for f in files]
    if not fs.exists(path):
        raise InputTableError(f"{url_list}: no such file or folder")
    return [url_list]


def _format(path: str, settings: DownloadSettings) -> str:
    fmt = settings.source.input_format or input_format_of(path)
    if fmt is None:
        raise InputTableError(
            f"{path}: unknown input format; name the file *.csv, *.parquet, ... or set input_format"
        )
    if fmt not in INPUT_FORMATS:
        raise InputTableError(f"{path}: unsupported input_format {fmt!r}; supported: {list(INPUT_FORMATS)}")
    return fmt


@contextlib.contextmanager
def _opened(path: str, fmt: str) -> Iterator[IO[bytes]]:
    try:
        with fsspec.open(path, "rb") as raw:
            _check_content(path, fmt, raw)
            yield cast(IO[bytes], gzip.GzipFile(fileobj=raw)) if fmt.endswith(".gz") else raw
    except InputTableError:  # about the rows read (a missing column): already says it all
        raise
    except FileNotFoundError as err:
        raise InputTableError(f"{path}: no such file") from err
    except _READ_ERRORS as err:
        raise InputTableError(f"{path}: cannot read as {fmt}: {err}") from err


# What a file's first bytes say it is, whatever its name or input_format says.
_MAGIC = {b"PAR1": "parquet", b"\x1f\x8b": "gzip"}


def _check_content(path: str, fmt: str, raw: IO[bytes]) -> None:
    """Refuse a format its content contradicts (a parquet file read as csv, a gzipped file read as
    plain text, or the other way round), naming both, rather than reading garbage as URLs."""
    if not raw.seekable():
        return
    head = raw.read(4)
    raw.seek(0)
    found = next((kind for magic, kind in _MAGIC.items() if head.startswith(magic)), None)
    wanted = "parquet" if fmt == "parquet" else "gzip" if fmt.endswith(".gz") else None
    if found != wanted and (found or wanted):
        says = f"a {found} file" if found else "not a " + str(wanted) + " file"
        raise InputTableError(
            f"{path}: input_format is {fmt!r}, but the file is {says}; set input_format to match"
        )


_READ_ERRORS = (pa.ArrowInvalid, ValueError, OSError, UnicodeDecodeError, EOFError)


def read_table(path: str, settings: DownloadSettings) -> pa.Table:
    """Read a URL file and return its rows with img2dataset's column names and order.

    The url column is renamed ``url``, the caption column ``caption``; extra columns keep their names.
    """
    fmt = _format(path, settings)
    with _opened(path, fmt) as stream:
        table = READERS[fmt.removesuffix(".gz")](stream)
    return _shaped(path, fmt, table, settings)


def read_batches(path: str, settings: DownloadSettings) -> Iterator[pa.Table]:
    """The rows of a URL file as read_table gives them, BATCH_ROWS or so at a time (a JSON array:
    all at once). _StreamBroken when a later batch cannot be read like the first ones."""
    fmt = _format(path, settings)
    stream = STREAMS.get(fmt.removesuffix(".gz"))
    if stream is None:
        yield read_table(path, settings)
        return
    with _opened(path, fmt) as f:
        batches = stream(f)
        first = next(batches, None)
        if first is None:  # an empty file: read_table says what it has (its columns, or the error)
            yield read_table(path, settings)
            return
        yield _shaped(path, fmt, first, settings)
        try:
            for batch in batches:
                yield _shaped(path, fmt, batch, settings)
        except _READ_ERRORS as err:
            raise _StreamBroken(str(err)) from err


def _shaped(path: str, fmt: str, table: pa.Table, settings: DownloadSettings) -> pa.Table:
    source = settings.source
    if fmt.startswith("txt") and (source.verify_hash_col or source.bbox_col):
        option = "verify_hash" if source.verify_hash_col else "bbox_col"
        raise InputTableError(f"{path}: {option} needs a column, and a {fmt} file holds URLs only")
    wanted = ["url"] if fmt.startswith("txt") else source.input_columns
    missing = [c for c in wanted if c not in table.column_names]
    if missing:
        raise InputTableError(
            f"{path}: missing column(s) {missing}; the file has {table.column_names} "
            "(set url_col / caption_col / save_additional_columns to match)"
        )
    if fmt.startswith("txt"):
        return table
    table = table.select(wanted)
    renames = source.renames
    table = table.rename_columns([renames.get(c, c) for c in table.column_names])
    return _urls_as_strings(path, table)


def _urls_as_strings(path: str, table: pa.Table) -> pa.Table:
    url = table.column("url")
    if pa.types.is_string(url.type) or pa.types.is_large_string(url.type):
        return table
    if pa.types.is_null(url.type) or pa.types.is_integer(url.type) or pa.types.is_floating(url.type):
        # A column of numbers or nulls cannot hold URLs: name the first offending row.
        raise InputTableError(f"{path}: row 0: the url column holds {url.type} values, not URLs")
    try:
        return table.set_column(table.column_names.index("url"), "url", url.cast(pa.string()))
    except pa.ArrowInvalid as err:
        raise InputTableError(f"{path}: the url column cannot be read as text: {err}") from err


@dataclass(frozen=True, slots=True)
class TableManifest:
    """What staging a URL file produced; saved as ``table.json`` and read by every shard."""

    table: str
    source: str
    input_format: str
    row_count: int
    columns: list[str]
    first_shard_id: int
    shard_count: int
    output_folder: str
    settings: DownloadSettings
    # input_fingerprint() of each shard's rows, in shard order: what a built shard was built from.
    fingerprints: list[str] = field(default_factory=list)

    @property
    def shard_ids(self) -> range:
        return range(self.first_shard_id, self.first_shard_id + self.shard_count)

    def fingerprint(self, shard_id: int) -> str | None:
        """The shard's input fingerprint; None for a table staged before fingerprints were kept."""
        index = shard_id - self.first_shard_id
        return self.fingerprints[index] if 0 <= index < len(self.fingerprints) else None

    def shard_name(self, shard_id: int) -> str:
        return shard_name(shard_id, self.settings.output.oom_shard_count)

    def to_dict(self) -> dict[str, Any]:
        return {
            "table": self.table,
            "source": self.source,
            "input_format": self.input_format,
            "row_count": self.row_count,
            "columns": self.columns,
            "first_shard_id": self.first_shard_id,
            "shard_count": self.shard_count,
            "output_folder": self.output_folder,
            "settings": self.settings.to_dict(),
            "fingerprints": self.fingerprints,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TableManifest:
        return cls(**{**data, "settings": DownloadSettings.from_dict(data["settings"])})


def input_fingerprint(rows: pa.Table) -> str:
    """A digest of a shard's input rows (values, column names and types), the same for the same rows
    whatever the file they came from was. It is taken over Arrow's IPC stream format, a stable,
    versioned format that, unlike parquet files, does not name the library that wrote it."""
    # Copied by take(): a slice's buffers still hold its neighbours' bytes, which the stream would carry.
    fresh = rows.replace_schema_metadata(None).take(pa.array(range(rows.num_rows), pa.int64()))
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, fresh.schema) as writer:
        writer.write_table(fresh)
    return hashlib.sha256(memoryview(sink.getvalue())).hexdigest()[:32]


class Staging:
    """The staging area: ``<root>/<table>/table.json`` and ``<root>/<table>/shards/<shard>.parquet``."""

    def __init__(self, root: str) -> None:
        # Absolute now: worker processes and later calls must not depend on the current folder.
        self.root = absolute(root).rstrip("/")

    def table_dir(self, table: str) -> str:
        return join(self.root, table)

    def shard_path(self, table: str, name: str) -> str:
        return join(self.root, table, "shards", f"{name}.parquet")

    def manifest(self, table: str) -> TableManifest:
        path = join(self.table_dir(table), MANIFEST_NAME)
        try:
            return TableManifest.from_dict(read_json(path))
        except FileNotFoundError as err:
            raise StagingMissingError(
                f"table {table!r} is not staged ({path} is missing): materialize url_tables[{table}] first"
            ) from err

    def tables(self) -> list[str]:
        fs, root = fsspec.core.url_to_fs(self.root)
        if not fs.exists(root):
            return []
        found = fs.glob(f"{root}/*/{MANIFEST_NAME}")
        return sorted(p.rstrip("/").split("/")[-2] for p in found)

    def stage(
        self,
        table: str,
        source: str,
        settings: DownloadSettings,
        output_folder: str,
        first_shard_id: int = 0,
    ) -> TableManifest:
        """Read ``source`` by batches, write its shards' input rows as each fills, then the
        manifest (last, so that a half-staged table never looks staged). Memory holds a batch and
        the shards being written, whatever the file's length."""
        try:
            rows, columns, fingerprints = self._write_shards(
                table, read_batches(source, settings), settings, first_shard_id
            )
        except _StreamBroken as err:
            log.warning("%s: read again whole, its later rows differ in type from its first: %s", source, err)
            rows, columns, fingerprints = self._write_shards(
                table, iter([read_table(source, settings)]), settings, first_shard_id
            )
        manifest = TableManifest(
            table=table,
            source=source,
            input_format=settings.source.input_format or input_format_of(source) or "",
            row_count=rows,
            columns=columns,
            first_shard_id=first_shard_id,
            shard_count=len(fingerprints),
            output_folder=output_folder.rstrip("/"),
            settings=settings,
            fingerprints=fingerprints,
        )
        write_json_atomic(join(self.table_dir(table), MANIFEST_NAME), manifest.to_dict())
        log.info("staged %s: %d rows in %d shards", table, rows, manifest.shard_count)
        return manifest

    def _write_shards(
        self, table: str, batches: Iterator[pa.Table], settings: DownloadSettings, first_shard_id: int
    ) -> tuple[int, list[str], list[str]]:
        """Cut the batches into shards of number_sample_per_shard rows and write each; returns the
        row count, the columns and each shard's input fingerprint, in order."""
        size = settings.source.number_sample_per_shard
        oom = settings.output.oom_shard_count
        writers = _LOCAL_WRITERS if local_path(self.root) is not None else _STORE_WRITERS

        def write_one(index: int, shard_rows: pa.Table) -> str:
            sink = pa.BufferOutputStream()
            pq.write_table(shard_rows, sink, compression="zstd")
            path = self.shard_path(table, shard_name(first_shard_id + index, oom))
            write_bytes_atomic(path, sink.getvalue().to_pybytes())
            return input_fingerprint(shard_rows)

        rows, columns = 0, list[str]()
        pending: list[pa.Table] = []
        pending_rows = 0
        futures: list[Future[str]] = []
        in_flight: deque[Future[str]] = deque()  # in submission order; the oldest is waited for first
        # At most 2 shards per thread wait, so that memory stays bounded when reading outpaces writing.
        with ThreadPoolExecutor(max_workers=writers) as pool:

            def submit(shard_rows: pa.Table) -> None:
                while in_flight and in_flight[0].done():
                    in_flight.popleft()
                if len(in_flight) >= 2 * writers:
                    in_flight.popleft().result()
                future = pool.submit(write_one, len(futures), shard_rows)
                futures.append(future)
                in_flight.append(future)

            for batch in batches:
                if not columns:
                    columns = batch.column_names
                rows += batch.num_rows
                pending.append(batch)
                pending_rows += batch.num_rows
                while pending_rows >= size:
                    joined = pa.concat_tables(pending)
                    submit(joined.slice(0, size))
                    pending, pending_rows = [joined.slice(size)], pending_rows - size
            if pending_rows:
                submit(pa.concat_tables(pending))
            fingerprints = [f.result() for f in futures]
        return rows, columns, fingerprints

    def shard_rows(self, table: str, name: str) -> pa.Table:
        path = self.shard_path(table, name)
        try:
            with fsspec.open(path, "rb") as f:
                return pq.read_table(f)
        except FileNotFoundError as err:
            raise StagingMissingError(
                f"shard {table}/{name}: staged input {path} is missing; re-materialize url_tables[{table}]"
            ) from err
