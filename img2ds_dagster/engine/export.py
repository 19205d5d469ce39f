"""The bucketed export, format ``bucketed_shards_v1``: the finished shards of ``resize_mode="bucket"``
regrouped by bucket into tars of a fixed number of samples, exact duplicates dropped by the SHA-256
of their source bytes, described by a ``manifest.json``::

    DEST/manifest.json
    DEST/buckets/<bucket_id>/shard-00000.tar     <key>.<ext>, <key>.json, <key>.txt per sample

Samples keep their shard keys (unique in an output folder) and their table order: a bucket's
samples are in the order of the shards, then of the rows, and are cut into tars of
``samples_per_tar``, the last one shorter. The first occurrence of a source SHA-256 is kept.

An export is planned from the shards' metadata parquets and stats files alone: each tar's digest
covers the export settings and, for each of its samples, its metadata row and the build of the shard
it comes from (the stats file's times: a rebuilt shard may encode the same source differently). A
re-export writes only the tars whose digest changed and keeps the others; samples that arrive
between others (a shard finished out of order) shift the tars after them in their bucket, which are
rewritten. Writing reads each source shard that feeds a changed tar once, in order, with one sample
in memory at a time.

A local export is built in a hidden folder beside DEST (kept tars hard-linked, not copied) and
swapped into place, so readers see the old export or the new one. An object store has no folder to
swap: changed tars are uploaded over the old ones, then ``manifest.json``, then the tars the new
export no longer has are deleted; a reader that lists the tars from the manifest it read can meet a
tar already rewritten for the next one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import tarfile
import time
import uuid
from collections.abc import Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import IO, Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import ExportError
from .sources import TableManifest
from .stats import STATS_SUFFIX, stats_path
from .storage import atomic_open, join, local_path, read_json, remove, write_json_atomic
from .writers import UstarStream, caption_text, sample_json

EXPORT_FORMAT = "bucketed_shards_v1"
MANIFEST = "manifest.json"
BUCKETS = "buckets"
# The card's export holds 1.18M samples in 1,170 tars: about a thousand per tar (60-100 MB of JPEG
# at a 512 base), large enough for sequential reads and small enough to shuffle at the tar level.
DEFAULT_SAMPLES_PER_TAR = 1000
IMAGE_FORMATS = ("jpg", "png", "webp")
DEDUP_SCOPES = ("table", "all")


@dataclass(frozen=True, slots=True)
class ExportSettings:
    samples_per_tar: int = DEFAULT_SAMPLES_PER_TAR
    dedup: bool = True  # drop samples whose source SHA-256 came before
    # "table": duplicates within the exported table; "all": also those of the tables before it
    # (the Dagster asset's option; an output folder's export has one source)
    dedup_scope: str = "table"

    def __post_init__(self) -> None:
        if self.samples_per_tar < 1:
            raise ExportError("samples_per_tar: must be at least 1")
        if self.dedup_scope not in DEDUP_SCOPES:
            raise ExportError(f"dedup_scope: {self.dedup_scope!r} is not one of {list(DEDUP_SCOPES)}")

    def to_dict(self) -> dict[str, Any]:
        return {"samples_per_tar": self.samples_per_tar, "dedup": self.dedup, "dedup_scope": self.dedup_scope}


@dataclass(frozen=True, slots=True)
class SourceShard:
    """A finished shard of a bucket-mode table."""

    table: str
    folder: str
    name: str
    output_format: str  # webdataset, files or parquet
    built: str  # its stats file's start and end time: which build of the shard this is

    @property
    def parquet_path(self) -> str:
        return join(self.folder, f"{self.name}.parquet")


@dataclass(frozen=True, slots=True)
class SourceTable:
    """A table's finished shards, in shard order, and what is known of how they were made."""

    table: str
    folder: str
    shards: list[SourceShard]
    shards_total: int | None = None  # the table's shard count, when its staging manifest is known
    input_fingerprint: str | None = None  # of the staged rows of the shards exported
    image_settings: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class _Planned:
    shard: int  # index in the plan's shard list
    key: str
    bucket: str
    digest: bytes


@dataclass(slots=True)
class _Tar:
    name: str  # buckets/<bucket>/shard-00000.tar
    bucket: str
    samples: list[_Planned] = field(default_factory=list)
    digest: str = ""


@dataclass(slots=True)
class ExportPlan:
    shards: list[SourceShard]
    tars: list[_Tar]
    buckets: dict[str, tuple[int, int]]  # bucket id -> (target width, target height)
    rows: int = 0
    successes: int = 0
    duplicates: int = 0
    captioned: int = 0
    image_ext: str = "jpg"


@dataclass(frozen=True, slots=True)
class ExportReport:
    destination: str
    manifest: dict[str, Any]
    tars_written: int
    tars_kept: int
    # why every tar was written, when each was: no previous export, other settings, ...; None when
    # only changed tars were
    rewrote_all: str | None
    seconds: float

    @property
    def samples(self) -> int:
        return int(self.manifest["totals"]["samples"])

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0


def finished_shards(folder: str, table: str, names: Sequence[str] | None = None) -> list[SourceShard]:
    """The shards of ``folder`` whose stats file exists (a shard's last file: it is complete), of the
    given names or all of them, in name order, with their output format."""
    fs, root = fsspec.core.url_to_fs(folder)
    if not fs.exists(root):
        return []
    listing = {info["name"].rstrip("/").rsplit("/", 1)[-1]: info for info in fs.ls(root, detail=True)}
    done = sorted(n.removesuffix(STATS_SUFFIX) for n in listing if n.endswith(STATS_SUFFIX))
    if names is not None:
        wanted = set(names)
        done = [n for n in done if n in wanted]
    if not done:
        return []
    stats = fs.cat([stats_path(root, n) for n in done], on_error="omit")
    shards = []
    for name in done:
        raw = stats.get(stats_path(root, name))
        if raw is None or f"{name}.parquet" not in listing:
            continue  # a dummy shard, or one being rewritten
        data = json.loads(raw)
        shards.append(
            SourceShard(table, folder.rstrip("/"), name, _output_format(name, listing), _built(data))
        )
    return shards


def _built(stats: Mapping[str, Any]) -> str:
    return f"{stats.get('start_time', 0)!r}-{stats.get('end_time', 0)!r}"


def _output_format(name: str, listing: Mapping[str, Mapping[str, Any]]) -> str:
    if f"{name}.tar" in listing:
        return "webdataset"
    entry = listing.get(name)
    if entry is not None and entry["type"] == "directory":
        return "files"
    if f"{name}.tfrecord" in listing:
        return "tfrecord"
    return "parquet"


def source_table(manifest: TableManifest) -> SourceTable:
    """A staged table's finished shards, refused unless it was built in bucket mode."""
    image = manifest.settings.image
    if image.resize_mode != "bucket":
        raise ExportError(
            f"table {manifest.table}: built with resize_mode={image.resize_mode!r}; the bucketed export "
            "takes shards built with resize_mode='bucket' (re-stage the table with it)"
        )
    names = {manifest.shard_name(i): i for i in manifest.shard_ids}
    shards = finished_shards(manifest.output_folder, manifest.table, list(names))
    prints = [manifest.fingerprint(names[s.name]) or "" for s in shards]
    return SourceTable(
        table=manifest.table,
        folder=manifest.output_folder,
        shards=shards,
        shards_total=manifest.shard_count,
        input_fingerprint=_digest(",".join(prints)) if shards and all(prints) else None,
        image_settings=_bucket_settings(image),
    )


def folder_source(folder: str, manifests: Iterable[TableManifest] = ()) -> SourceTable:
    """Every finished shard of an output folder, as one source (``download()`` numbers the shards of
    all its URL files in one sequence); the tables' staging manifests, when given, add their settings
    and fingerprints and refuse tables not built in bucket mode."""
    known = list(manifests)
    for manifest in known:
        source_table(manifest)  # refuses a table of another resize mode, by name
    tables = {m.shard_name(i): m for m in known for i in m.shard_ids}
    shards = [
        dataclasses.replace(s, table=tables[s.name].table if s.name in tables else "")
        for s in finished_shards(folder, "")
    ]
    prints = [tables[s.name].fingerprint(int(s.name)) if s.name in tables else None for s in shards]
    settings = [_bucket_settings(m.settings.image) for m in known]
    return SourceTable(
        table=",".join(m.table for m in known) or folder.rstrip("/").rsplit("/", 1)[-1],
        folder=folder.rstrip("/"),
        shards=shards,
        shards_total=sum(m.shard_count for m in known) or None,
        input_fingerprint=_digest(",".join(p or "" for p in prints)) if shards and all(prints) else None,
        image_settings=settings[0] if settings and all(s == settings[0] for s in settings) else None,
    )


def _bucket_settings(image: Any) -> dict[str, Any]:
    return {
        "resize_mode": image.resize_mode,
        "bucket_base": image.bucket_base,
        "bucket_divisible": image.bucket_divisible,
        "bucket_crop": image.bucket_crop,
        "bucket_corners": list(image.bucket_corners),
        "exif_transpose": image.transposes,
        "encode_format": image.encode_format,
        "encode_quality": image.encode_quality,
        # images.py: 4:4:4 chroma when the resize scale is at most this, else 4:2:0
        "subsampling_policy": "adaptive_scale",
        "adaptive_threshold": 0.85,
    }


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32]


_PLAN_COLUMNS = ("key", "status", "bucket_id", "target_width", "target_height")


def plan_export(
    sources: Sequence[SourceTable], settings: ExportSettings, seen: set[str] | None = None
) -> ExportPlan:
    """Which sample goes to which tar. ``seen``: source SHA-256s to drop as duplicates before any
    (those of earlier tables, for dedup_scope="all")."""
    seen = set() if seen is None else seen
    shards = [s for source in sources for s in source.shards]
    plan = ExportPlan(shards=shards, tars=[], buckets={})
    by_bucket: dict[str, list[_Planned]] = {}
    for index, shard in enumerate(shards):
        if shard.output_format not in ("webdataset", "files", "parquet"):
            raise ExportError(
                f"{shard.folder}/{shard.name}: output_format {shard.output_format!r} cannot be read back "
                "for the export; build the table with output_format webdataset, files or parquet"
            )
        table = _metadata(shard)
        names = set(table.column_names)
        missing = [c for c in _PLAN_COLUMNS if c not in names]
        if missing:
            raise ExportError(
                f"{shard.parquet_path}: no column(s) {missing}; the bucketed export takes shards built "
                "with resize_mode='bucket'"
            )
        if settings.dedup and "sha256" not in names:
            raise ExportError(
                f"{shard.parquet_path}: no sha256 column to find duplicates by; build with "
                "compute_hash='sha256' (the default) or export with dedup off"
            )
        for row in table.to_pylist():
            plan.rows += 1
            if row["status"] != "success":
                continue
            plan.successes += 1
            if settings.dedup:
                if row["sha256"] in seen:
                    plan.duplicates += 1
                    continue
                seen.add(row["sha256"])
            bucket = str(row["bucket_id"])
            plan.buckets.setdefault(bucket, (int(row["target_width"]), int(row["target_height"])))
            plan.captioned += bool(row.get("caption"))
            row_digest = hashlib.sha256(
                json.dumps(row, sort_keys=True, default=str).encode() + shard.built.encode()
            ).digest()
            by_bucket.setdefault(bucket, []).append(_Planned(index, str(row["key"]), bucket, row_digest))
    plan.image_ext = _image_ext(shards)
    settings_digest = json.dumps(settings.to_dict(), sort_keys=True).encode()
    for bucket in sorted(by_bucket):
        samples = by_bucket[bucket]
        for number, start in enumerate(range(0, len(samples), settings.samples_per_tar)):
            tar = _Tar(f"{BUCKETS}/{bucket}/shard-{number:05d}.tar", bucket)
            tar.samples = samples[start : start + settings.samples_per_tar]
            h = hashlib.sha256(settings_digest)
            for sample in tar.samples:
                h.update(sample.digest)
            tar.digest = h.hexdigest()[:32]
            plan.tars.append(tar)
    return plan


def _metadata(shard: SourceShard) -> pa.Table:
    """A shard's metadata rows (for the parquet output format, without its image column)."""
    with _open(shard.parquet_path) as f:
        names = pq.read_schema(f).names
        columns = [c for c in names if c not in IMAGE_FORMATS or shard.output_format != "parquet"]
        return pq.read_table(f, columns=columns)


def _image_ext(shards: Sequence[SourceShard]) -> str:
    """The image extension of the first image found (a table has one encode_format)."""
    for shard in shards:
        images = read_images(shard, None)
        first = next(images, None)
        images.close()
        if first is not None:
            return first[1]
    return "jpg"


def _open(path: str) -> IO[bytes]:
    return fsspec.open(path, "rb").open()  # type: ignore[no-any-return]


def read_images(shard: SourceShard, keys: set[str] | None) -> Generator[tuple[str, str, bytes]]:
    """(key, extension, bytes) of the images of the samples of ``keys`` (None: all), in the
    shard's order."""
    if shard.output_format == "webdataset":
        with (
            _open(join(shard.folder, f"{shard.name}.tar")) as raw,
            tarfile.open(fileobj=raw, mode="r|") as tar,
        ):
            for member in tar:
                key, _, ext = member.name.rsplit("/", 1)[-1].partition(".")
                if (keys is None or key in keys) and ext in IMAGE_FORMATS:
                    data = tar.extractfile(member)
                    if data is not None:
                        yield key, ext, data.read()
    elif shard.output_format == "files":
        fs, root = fsspec.core.url_to_fs(join(shard.folder, shard.name))
        found = {}
        for path in fs.ls(root, detail=False):
            key, _, ext = str(path).rsplit("/", 1)[-1].partition(".")
            if (keys is None or key in keys) and ext in IMAGE_FORMATS:
                found[key] = (ext, path)
        for key in sorted(found):
            ext, path = found[key]
            yield key, ext, fs.cat_file(path)
    else:
        with _open(shard.parquet_path) as f:
            names = pq.read_schema(f).names
            ext = next((c for c in IMAGE_FORMATS if c in names), "")
            if not ext:
                return
            table = pq.read_table(f, columns=["key", ext])
        for key, data in zip(table.column("key").to_pylist(), table.column(ext).to_pylist(), strict=True):
            if (keys is None or key in keys) and data is not None:
                yield key, ext, data


def export_plan(
    plan: ExportPlan,
    destination: str,
    sources: Sequence[SourceTable],
    settings: ExportSettings,
    dedup_against: Sequence[SourceTable] = (),
) -> ExportReport:
    """Write the planned export to ``destination``, only its changed tars (see the module's doc)."""
    started = time.perf_counter()
    destination = destination.rstrip("/")
    previous, why = _previous(destination, settings)
    kept = {t.name for t in plan.tars if previous.get(t.name) == t.digest}
    changed = [t for t in plan.tars if t.name not in kept]
    rewrote_all = why if not kept and plan.tars else None
    manifest = _manifest(plan, sources, settings, dedup_against)
    old_manifest = _read_manifest(destination)
    if not changed and old_manifest is not None and old_manifest.get("export_id") == manifest["export_id"]:
        return ExportReport(destination, old_manifest, 0, len(kept), None, time.perf_counter() - started)
    local = local_path(destination)
    if local is not None:
        _write_local(local, plan, changed, kept, manifest)
    else:
        _write_store(destination, plan, changed, manifest, old_manifest)
    return ExportReport(
        destination, manifest, len(changed), len(kept), rewrote_all, time.perf_counter() - started
    )


def _read_manifest(destination: str) -> dict[str, Any] | None:
    try:
        data = read_json(join(destination, MANIFEST))
    except (FileNotFoundError, ValueError, OSError):
        return None
    return data if isinstance(data, dict) and data.get("format") == EXPORT_FORMAT else None


def _previous(destination: str, settings: ExportSettings) -> tuple[dict[str, str], str]:
    """The previous export's tar digests by name, and why none can be kept when that is so."""
    old = _read_manifest(destination)
    if old is None:
        return {}, "no previous export at the destination"
    if old.get("settings", {}).get("export") != settings.to_dict():
        return {}, "the export settings changed"
    digests = {t["name"]: t["digest"] for b in old.get("buckets", []) for t in b.get("shards", [])}
    return digests, "every tar's samples changed"


def _manifest(
    plan: ExportPlan,
    sources: Sequence[SourceTable],
    settings: ExportSettings,
    dedup_against: Sequence[SourceTable],
) -> dict[str, Any]:
    buckets: list[dict[str, Any]] = []
    for bucket in sorted(plan.buckets):
        tars = [t for t in plan.tars if t.bucket == bucket]
        width, height = plan.buckets[bucket]
        buckets.append(
            {
                "bucket_id": bucket,
                "target_width": width,
                "target_height": height,
                "count": sum(len(t.samples) for t in tars),
                "shards": [{"name": t.name, "samples": len(t.samples), "digest": t.digest} for t in tars],
            }
        )
    samples = sum(int(b["count"]) for b in buckets)
    content = hashlib.sha256("".join(t.digest for t in plan.tars).encode()).hexdigest()[:16]
    image_settings = [s.image_settings for s in sources if s.image_settings]
    return {
        "format": EXPORT_FORMAT,
        "export_id": content,  # the same samples in the same tars give the same id
        "created": datetime.now(UTC).isoformat(),
        "image_mode": "reencode_" + ("jpeg" if plan.image_ext == "jpg" else plan.image_ext),
        "settings": {"export": settings.to_dict(), "images": image_settings[0] if image_settings else None},
        "totals": {
            "samples": samples,
            "tars": len(plan.tars),
            "buckets": len(buckets),
            "source_rows": plan.rows,
            "source_successes": plan.successes,
            "duplicates_removed": plan.duplicates,
            "captioned": plan.captioned,
            "caption_coverage": round(plan.captioned / samples, 6) if samples else 0.0,
        },
        "sources": [_source_entry(s) for s in sources],
        "dedup_against": [_source_entry(s) for s in dedup_against],
        "buckets": buckets,
    }


def _source_entry(source: SourceTable) -> dict[str, Any]:
    return {
        "table": source.table,
        "folder": source.folder,
        "shards_exported": len(source.shards),
        "shards_total": source.shards_total,
        "input_fingerprint": source.input_fingerprint,
    }


class _TarWriters:
    """The changed tars being written, each filled as its samples come, in order, and closed when
    complete."""

    def __init__(self, plan: ExportPlan, changed: Sequence[_Tar], opener: Any) -> None:
        self.shards = plan.shards
        self.opener = opener  # name -> a context manager giving a binary file
        self.where: dict[tuple[int, str], _Tar] = {
            (s.shard, s.key): tar for tar in changed for s in tar.samples
        }
        self.left = {tar.name: len(tar.samples) for tar in changed}
        self.open: dict[str, tuple[contextlib.ExitStack, UstarStream]] = {}

    def write_all(self) -> None:
        wanted: dict[int, set[str]] = {}
        for index, key in self.where:
            wanted.setdefault(index, set()).add(key)
        for index in sorted(wanted):
            shard = self.shards[index]
            rows = {str(r["key"]): r for r in _metadata(shard).to_pylist()}
            got = 0
            for key, ext, image in read_images(shard, wanted[index]):
                self._add(self.where[(index, key)], shard, rows[key], ext, image)
                got += 1
            if got != len(wanted[index]):
                raise ExportError(
                    f"{shard.folder}/{shard.name}: {len(wanted[index]) - got} successful samples have "
                    "no image in the shard (was it rewritten during the export?)"
                )

    def _add(self, tar: _Tar, shard: SourceShard, row: dict[str, Any], ext: str, image: bytes) -> None:
        if tar.name not in self.open:
            stack = contextlib.ExitStack()
            self.open[tar.name] = (stack, UstarStream(stack.enter_context(self.opener(tar.name))))
        stack, stream = self.open[tar.name]
        key = str(row["key"])
        meta = {**row, "source_table": shard.table, "source_shard": shard.name}
        members = {ext: image, "json": sample_json(meta), "txt": caption_text(row.get("caption"))}
        for member in sorted(members):
            stream.add(f"{key}.{member}", members[member])
        self.left[tar.name] -= 1
        if self.left[tar.name] == 0:
            stream.close()
            del self.open[tar.name]
            stack.close()

    def abort(self) -> None:
        for stack, _ in self.open.values():
            with contextlib.suppress(Exception):
                stack.__exit__(RuntimeError, RuntimeError("export aborted"), None)
        self.open.clear()


def _write_local(
    local: str, plan: ExportPlan, changed: Sequence[_Tar], kept: set[str], manifest: dict[str, Any]
) -> None:
    parent, name = os.path.split(os.path.abspath(local))
    os.makedirs(parent, exist_ok=True)
    work = os.path.join(parent, f".{name}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        for tar in plan.tars:
            os.makedirs(os.path.join(work, BUCKETS, tar.bucket), exist_ok=True)
            if tar.name in kept:
                _link_or_copy(os.path.join(local, tar.name), os.path.join(work, tar.name))

        def opener(tar_name: str) -> IO[bytes]:
            return open(os.path.join(work, tar_name), "wb")

        writers = _TarWriters(plan, changed, opener)
        try:
            writers.write_all()
        finally:
            writers.abort()
        with open(os.path.join(work, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
        old = None
        if os.path.exists(local):
            old = os.path.join(parent, f".{name}.old-{uuid.uuid4().hex[:12]}")
            os.replace(local, old)
        os.replace(work, local)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:  # another filesystem, or links not allowed
        shutil.copyfile(source, target)


def _write_store(
    destination: str,
    plan: ExportPlan,
    changed: Sequence[_Tar],
    manifest: dict[str, Any],
    old: dict[str, Any] | None,
) -> None:
    writers = _TarWriters(plan, changed, lambda tar_name: atomic_open(join(destination, tar_name)))
    try:
        writers.write_all()
    finally:
        writers.abort()
    write_json_atomic(join(destination, MANIFEST), manifest)
    now = {t.name for t in plan.tars}
    before = {t["name"] for b in (old or {}).get("buckets", []) for t in b.get("shards", [])}
    for stale in sorted(before - now):
        remove(join(destination, stale))


def export_tables(
    sources: Sequence[SourceTable],
    destination: str,
    settings: ExportSettings,
    dedup_against: Sequence[SourceTable] = (),
) -> ExportReport:
    """Plan and write the export of ``sources`` (after dropping what ``dedup_against`` holds)."""
    seen: set[str] = set()
    if settings.dedup and dedup_against:
        seen = _hashes(dedup_against)
    plan = plan_export(sources, settings, seen)
    return export_plan(plan, destination, sources, settings, dedup_against)


def _hashes(sources: Sequence[SourceTable]) -> set[str]:
    """The source SHA-256 of every successful sample of these tables."""
    found: set[str] = set()
    for source in sources:
        for shard in source.shards:
            with _open(shard.parquet_path) as f:
                table = pq.read_table(f, columns=["status", "sha256"])
            found.update(h for s, h in zip(*table.to_pydict().values(), strict=True) if s == "success" and h)
    return found
