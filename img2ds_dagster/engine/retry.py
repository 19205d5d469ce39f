"""Retry only the failed samples of a built shard (``Workers.retry_failed``): which failures are
transient, worth another download, and the shard's other rows read back from its own files, so that
the rewritten shard is byte for byte the one a first build would have written had those downloads
succeeded.

What is transient is read from the error messages the engine writes (fetch.py, polite.py): the
parquet keeps a row's message, not the exception it came from.
"""

from __future__ import annotations

import re
import tarfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import strip_protocol

from .cpu import Spool, SpoolRef
from .settings import DownloadSettings, OutputFormat
from .stats import stats_path
from .storage import join, read_json
from .tfrecord import TFRecordError, read_tfrecord
from .writers import ShardTarget

# Failures that another try may not meet: no answer in time, a connection refused, reset or cut
# short, a temporary DNS failure, the server's 408/425/429 or 5xx, a host given up or paused for
# the run after such failures, a robots.txt that could not be read this run. Not retried: what
# the server or the site said about this URL (404, 403, other 4xx, X-Robots-Tag, TDM, robots.txt
# rules, XMP), what the bytes are (decode, resize, size caps, hash mismatch), invalid URLs, SSL
# errors, and the messages of aiohttp errors fetch.py has no words for (they name nothing to match).
_TRANSIENT = re.compile(
    r"^(?:timed out"
    r"|HTTP Error (?:408|425|429|5\d\d)\b"
    r"|connection refused\b"
    r"|cannot connect\b"  # "cannot connect: <reason>", "cannot connect to the proxy ..."
    r"|bad HTTP response: "
    r"|connection closed before the whole body arrived"
    r"|cannot resolve host: Temporary failure in name resolution)"
    r"|^[^ ]*: host given up after \d+ failures in a row"
    r"|^[^ ]*: host asked to slow down: paused"
    r"|every path disallowed for this run\)?$"
)
# The one opt-out kind (ShardStats.opt_outs) that a transient failure is counted under.
ROBOTS_UNAVAILABLE = "robots.txt unavailable"
_ROBOTS_UNAVAILABLE = re.compile(r"every path disallowed for this run\)?$")
# A files shard's images are read this many at a time (fs.cat holds a batch in memory).
_FILES_AT_ONCE = 256


def is_transient(status: str | None, error: str | None) -> bool:
    """Whether a row that ended with this status and error message is worth downloading again."""
    return status == "failed_to_download" and error is not None and _TRANSIENT.search(error) is not None


@dataclass(frozen=True, slots=True)
class Retried:
    """What a retry_failed build did to a shard."""

    retried: int = 0  # rows downloaded again
    recovered: int = 0  # of them, now successes
    rebuilt: str | None = None  # why the whole shard was built instead, when it was


@dataclass(slots=True)
class Previous:
    """A complete shard as last written: each row's metadata and, for its successes, its image
    (in the spool; none read when no row is to be retried); which rows to download again; the
    opt-outs of the rows kept; its stats file."""

    meta: list[dict[str, Any]]
    images: dict[int, SpoolRef]
    retry: list[int]  # row indexes, in order
    opt_outs: Counter[str]
    stats: dict[str, Any]


def transient_failures(folder: str, name: str) -> int | None:
    """How many rows of a complete shard failed transiently; None if the shard is not complete (no
    stats file or no readable parquet), which a retry_failed build builds in full."""
    try:
        read_json(stats_path(folder, name))
        with fsspec.open(join(folder, f"{name}.parquet"), "rb") as f:
            table = pq.read_table(f, columns=["status", "error_message"])
    except (FileNotFoundError, OSError, ValueError, pa.ArrowException):
        return None
    statuses = table.column("status").to_pylist()
    errors = table.column("error_message").to_pylist()
    return sum(is_transient(s, e) for s, e in zip(statuses, errors, strict=True))


def read_previous(  # noqa: PLR0913 - what a shard is made of, given by the shard builder
    target: ShardTarget,
    output_format: OutputFormat,
    rows: pa.Table,
    *,
    keys: Sequence[str],
    settings: DownloadSettings,
    spool: Spool,
) -> Previous | str:
    """The shard as it is written now, its successes' images put in ``spool``; or why it cannot be
    kept, and must be built in full (not complete, built from other rows or settings, a format
    whose images cannot be read back)."""
    if output_format == "dummy":
        return "the dummy format keeps no images to read back"
    try:
        stats = read_json(stats_path(target.folder, target.name))
        with fsspec.open(target.parquet_path, "rb") as f:
            table = pq.read_table(f)
    except (FileNotFoundError, OSError, ValueError, pa.ArrowException) as err:
        return f"no complete shard to retry ({type(err).__name__}: {err})"
    expected = target.schema
    if output_format == "parquet":
        expected = pa.schema([*expected, pa.field(target.encode_format, pa.binary())])
    if not table.schema.equals(expected, check_metadata=False):
        return "the shard's metadata columns are not those of the table's settings now"
    # compute_hash's column replaces verify_hash's (staged under the same name): not an input here.
    inputs = [c for c in rows.column_names if c != settings.output.compute_hash]
    if table.num_rows != rows.num_rows or stats.get("count") != rows.num_rows:
        return "the shard was built from other rows"
    if any(not table.column(c).equals(rows.column(c)) for c in inputs):
        return "the shard was built from other rows"
    if table.column("key").to_pylist() != list(keys):
        return "the shard's keys are not the table's keys now"
    meta = table.select(target.schema.names).to_pylist()
    retry = [i for i, m in enumerate(meta) if is_transient(m["status"], m["error_message"])]
    if not retry:  # the shard stays as it is
        return Previous(meta, {}, [], Counter(), stats)
    successes = {m["key"]: i for i, m in enumerate(meta) if m["status"] == "success"}
    images = _read_images(target, output_format, table, successes, spool)
    if isinstance(images, str):
        return images
    opt_outs: Counter[str] = Counter(stats.get("opt_outs", {}))
    unavailable = sum(1 for i in retry if _ROBOTS_UNAVAILABLE.search(meta[i]["error_message"]))
    if unavailable:
        opt_outs[ROBOTS_UNAVAILABLE] -= unavailable
        opt_outs = +opt_outs  # drops the kinds counted down to 0
    return Previous(meta, images, retry, opt_outs, stats)


def _read_images(
    target: ShardTarget,
    output_format: OutputFormat,
    table: pa.Table,
    successes: dict[str, int],
    spool: Spool,
) -> dict[int, SpoolRef] | str:
    """Each success's encoded image, by row index, read from the shard's files into the spool."""
    reader = IMAGE_READERS.get(output_format)
    if reader is None:
        return f"the {output_format} format's images cannot be read back"
    try:
        images = reader(target, table, successes, spool)
    except (FileNotFoundError, OSError, tarfile.TarError, TFRecordError) as err:
        return f"the shard's images cannot be read back ({type(err).__name__}: {err})"
    if len(images) != len(successes):
        return f"the shard holds {len(images)} of its {len(successes)} successes' images"
    return images


def _parquet_images(
    target: ShardTarget, table: pa.Table, successes: dict[str, int], spool: Spool
) -> dict[int, SpoolRef]:
    wanted = set(successes.values())
    column = table.column(target.encode_format).to_pylist()
    return {i: spool.put(data) for i, data in enumerate(column) if i in wanted and data is not None}


def _tar_images(
    target: ShardTarget, table: pa.Table, successes: dict[str, int], spool: Spool
) -> dict[int, SpoolRef]:
    images: dict[int, SpoolRef] = {}
    with (
        fsspec.open(join(target.folder, f"{target.name}.tar"), "rb") as f,
        tarfile.open(fileobj=f, mode="r|") as tar,
    ):
        for member in tar:  # streamed: one member in memory at a time
            key, _, ext = member.name.rpartition(".")
            if ext == target.encode_format and key in successes and (data := tar.extractfile(member)):
                images[successes[key]] = spool.put(data.read())
    return images


def _folder_images(
    target: ShardTarget, table: pa.Table, successes: dict[str, int], spool: Spool
) -> dict[int, SpoolRef]:
    folder = join(target.folder, target.name)
    fs, _ = fsspec.core.url_to_fs(folder)
    paths = [join(folder, f"{key}.{target.encode_format}") for key in successes]
    # fs.cat names its files without the protocol
    index = {strip_protocol(p): i for p, i in zip(paths, successes.values(), strict=True)}
    images: dict[int, SpoolRef] = {}
    for start in range(0, len(paths), _FILES_AT_ONCE):
        for path, data in fs.cat(paths[start : start + _FILES_AT_ONCE], on_error="omit").items():
            images[index[strip_protocol(path)]] = spool.put(data)
    return images


def _tfrecord_images(
    target: ShardTarget, table: pa.Table, successes: dict[str, int], spool: Spool
) -> dict[int, SpoolRef]:
    images: dict[int, SpoolRef] = {}
    for example in read_tfrecord(join(target.folder, f"{target.name}.tfrecord")):
        key, image = example.get("key") or [], example.get(target.encode_format) or []
        if key and image and isinstance(key[0], bytes) and isinstance(image[0], bytes):
            index = successes.get(key[0].decode())
            if index is not None:
                images[index] = spool.put(image[0])
    return images


# How each format's images are read back (dummy keeps none).
IMAGE_READERS: dict[str, Callable[[ShardTarget, pa.Table, dict[str, int], Spool], dict[int, SpoolRef]]] = {
    "parquet": _parquet_images,
    "webdataset": _tar_images,
    "files": _folder_images,
    "tfrecord": _tfrecord_images,
}
