"""What happens to one URL: download it, hash it (and check the expected hash), read its header,
decode, filter, resize and encode it, read its EXIF; the result is an ``Outcome``, and with the input
row, the sample's metadata row.

Per-sample failures are outcomes (a status and an error message), never exceptions: an exception
here is a bug, and fails the shard.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from .buckets import Bucket
from .cpu import CpuPool, Spool, SpoolRef
from .fetch import Fetcher
from .images import ImageError, ImageProcessor, digest, exif_json, parse_boxes
from .probe import probe
from .settings import DownloadSettings


@dataclass(frozen=True, slots=True)
class SampleTask:
    """What downloading and processing one input row needs."""

    url: str | None
    expected_hash: str | None = None  # verify_hash's column
    boxes: Any = None  # bbox_col's value: the boxes to blur


def sample_tasks(rows: pa.Table, settings: DownloadSettings) -> list[SampleTask]:
    """One task per staged input row, in row order."""
    source = settings.source
    urls = rows.column("url").to_pylist()
    none = [None] * len(urls)
    hashes = rows.column(source.verify_hash_type).to_pylist() if source.verify_hash_type else none
    boxes = rows.column(source.bbox_col).to_pylist() if source.bbox_col is not None else none
    return [SampleTask(u, h, b) for u, h, b in zip(urls, hashes, boxes, strict=True)]


@dataclass(slots=True)
class Outcome:
    """What became of one input row; the image waits in the shard's spool."""

    status: str  # success, failed_to_download or failed_to_resize
    error: str | None = None
    image: SpoolRef | None = None
    width: int | None = None
    height: int | None = None
    original_width: int | None = None
    original_height: int | None = None
    exif: str | None = None
    hash: str | None = None
    waits: int = 0  # waits before retrying its download (Retry-After or backoff)
    waited: float = 0.0  # seconds
    opt_out: str | None = None  # the kind of site signal that refused it
    bucket: Bucket | None = None  # resize_mode="bucket": the one it went to, or would have needed upsampling


class SampleWorker:
    """Runs samples: the fetcher's event loop downloads, then the CPU pool (one thread per core,
    shared by the shards being built) hashes and processes the bytes."""

    def __init__(
        self, settings: DownloadSettings, fetcher: Fetcher, spool: Spool, cpu: CpuPool, lane: int
    ) -> None:
        self.fetcher = fetcher
        self.processor = ImageProcessor(settings.image)
        self.spool = spool
        self.cpu = cpu
        self.lane = lane  # this shard's place in the CPU pool's order
        self.extract_exif = settings.output.extract_exif
        self.hash_type = settings.output.compute_hash
        self.verify = settings.source.verify_hash_type is not None
        self.keep_bytes = settings.image.disable_all_reencoding
        self.respect_xmp = settings.fetch.respect_xmp_data_mining

    async def run(
        self, task: SampleTask, downloaded: Callable[[], None] | None = None, defer: bool = False
    ) -> Outcome:
        """Runs on the fetcher's event loop; ``downloaded`` is called once the download is over (the
        image work follows). With ``defer``, Deferred (polite.py) if the host would make it wait."""
        if not task.url:
            return Outcome("failed_to_download", "empty URL")
        try:
            fetched = await self.fetcher.fetch_async(task.url, defer)
        finally:
            if downloaded is not None:
                downloaded()
        if fetched.data is None:
            return Outcome(
                "failed_to_download",
                fetched.error,
                waits=fetched.waits,
                waited=fetched.waited,
                opt_out=fetched.opt_out,
            )
        raw = fetched.data
        outcome = await asyncio.wrap_future(self.cpu.submit(lambda: self.process(raw, task), self.lane))
        outcome.waits, outcome.waited = fetched.waits, fetched.waited
        return outcome

    def process(self, raw: bytes, task: SampleTask) -> Outcome:
        """Downloaded bytes to an outcome; runs on a CPU thread."""
        if self.respect_xmp:
            prohibited = xmp_data_mining_prohibition(raw)
            if prohibited is not None:
                message = f"Use of image prohibited by its XMP DataMining field ({prohibited})"
                return Outcome("failed_to_download", message, opt_out="xmp-data-mining")
        hash_ = digest(raw, self.hash_type) if self.hash_type else None
        if self.verify and hash_ != task.expected_hash:
            return Outcome("failed_to_download", "hash mismatch")
        if self.keep_bytes:
            # disable_all_reencoding: the bytes as downloaded, not even decoded (img2dataset's rule).
            exif = exif_json(raw, probe(raw)) if self.extract_exif else None
            return Outcome("success", image=self.spool.put(raw), exif=exif, hash=hash_)
        header = probe(raw)
        try:
            image = self.processor.process(raw, header, parse_boxes(task.boxes))
        except ImageError as err:
            # The original size is known when the header said why (a bucket that would need upsampling).
            width, height = err.original or (None, None)
            return Outcome(
                "failed_to_resize", str(err), original_width=width, original_height=height, bucket=err.bucket
            )
        return Outcome(
            "success",
            image=self.spool.put(image.data),
            width=image.width,
            height=image.height,
            original_width=image.original_width,
            original_height=image.original_height,
            exif=exif_json(raw, header) if self.extract_exif else None,
            hash=hash_,
            bucket=image.bucket,
        )


# IPTC/PLUS's DataMining values that prohibit using the image to train AI/ML models: all of them but
# DMI-UNSPECIFIED and the DMI-ALLOWED ones (SEECONSTRAINT points at conditions we cannot read).
_DMI = re.compile(rb"DMI-PROHIBITED(?:-[A-Z]+)?")


def xmp_data_mining_prohibition(raw: bytes) -> str | None:
    """The prohibiting DataMining value of the image's XMP packet, if any: a byte search of the raw
    file (XMP is plain text in JPEG, PNG, WebP, TIFF and GIF), no metadata parsing."""
    if b"DataMining" not in raw:
        return None
    found = _DMI.search(raw)
    return found.group().decode() if found else None


def metadata_row(
    row: dict[str, Any], key: str, outcome: Outcome, settings: DownloadSettings
) -> dict[str, Any]:
    """The sample's metadata row, in img2dataset's column order: the input columns, the sample's
    own, then exif and the hash."""
    meta = {
        **row,
        "key": key,
        "status": outcome.status,
        "error_message": outcome.error,
        "width": outcome.width,
        "height": outcome.height,
        "original_width": outcome.original_width,
        "original_height": outcome.original_height,
    }
    if settings.image.resize_mode == "bucket":
        bucket = outcome.bucket
        meta["bucket_id"] = bucket.id if bucket else None
        meta["target_width"] = bucket.width if bucket else None
        meta["target_height"] = bucket.height if bucket else None
    if settings.output.extract_exif:
        meta["exif"] = outcome.exif
    hash_type = settings.output.compute_hash
    if hash_type is not None:
        # Also replaces verify_hash's column (staged under the hash type's name), as img2dataset does.
        meta[hash_type] = outcome.hash
    return meta
