"""The machine's CPU ceiling for the image work alone: how many images per second it can decode, resize,
pad and re-encode when nothing else (network, parsing, writing) gets in the way.

::

    python -m benchmarks.cpu_ceiling --corpus benchmarks/.corpus [--threads N] [--limit N] [--json out.json]

The corpus's good images (every kind but the faults) are read into memory, then processed exactly as a
shard's CPU threads do it, with ``image_size=256, resize_mode="border", encode_format="jpg",
encode_quality=95`` (img2dataset's interpolations): ``probe()`` the header, then
``ImageProcessor.process()``, on a pool of threads (OpenCV releases the GIL; ``cv2.setNumThreads(1)``
as ``build_shard`` sets it). Runs:

- full decode (``reduced_jpeg_decode=False``) and reduced JPEG decode (``True``), on all threads;
- the same two on one thread;
- the whole per-sample CPU work of a download thread (probe, process, ``exif_json`` and sha256 of the
  original bytes), reduced decode, on all threads: EXIF parsing is pure Python and holds the GIL;
- one thread timing probe, ``exif_json`` and sha256 per image.

Per run: images/s (wall), CPU ms per image (``time.process_time()``, all threads), and per format the
CPU ms per image (each thread's ``time.thread_time()`` around each image) and its share of the CPU.
``other cores`` is how busy the rest of the machine was meanwhile (from /proc/stat): well above 0, the
run shared the cores with something else and its images/s is low.

Measured on this machine (2 vCPUs, AMD EPYC; OpenCV 5.0.0 with libjpeg-turbo 3.1.2; the seed-0 corpus of
5000, i.e. 4500 good images of 0.92 MPix on average; ``--rounds 3``; runs on this VM vary by about 8%):

=============================  ========  ===========  ==========================================
run                            images/s  CPU ms/img   CPU ms/img: jpeg / gray / png / png-alpha / webp
=============================  ========  ===========  ==========================================
full decode, 2 threads         258       7.6          6.7 / 4.0 / 12.0 / 17.5 / 8.4
reduced decode, 2 threads      501       3.9          2.5 / 1.8 / 10.0 / 14.5 / 6.3
full decode, 1 thread          131       7.6
reduced decode, 1 thread       265       3.8
whole sample, 2 threads        494       4.0          2.5 / 1.8 / 10.1 / 14.7 / 6.0
=============================  ========  ===========  ==========================================

The PNGs are 12% of the images and 36% of the CPU with reduced decode: they are photos (8 bits per
pixel to inflate and unfilter) and cannot be decoded at a reduced size. "Reduced" is the default
processing: large JPEGs decoded at 1/2, 1/4 or 1/8 scale, other large images averaged down by a whole
factor, then a last resize of under 2x. Per image on one thread: ``probe`` 0.01 ms, ``exif_json``
0.04 ms on average (0.18 ms for the 23% with an EXIF block, nothing without one), sha256 0.11 ms
(1.7 GB/s): together about 4% of the image work.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import statistics
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from benchmarks.corpus import GOOD_KINDS, Entry, corpus_dir, load_corpus
from benchmarks.measure import machine
from img2ds_dagster.engine.images import ImageError, ImageProcessor, digest, exif_json
from img2ds_dagster.engine.probe import probe
from img2ds_dagster.engine.settings import ImageSettings

WARMUP = 32  # images processed once before each run, so that codec set-up is not timed


@dataclass(frozen=True, slots=True)
class Image:
    entry: Entry
    raw: bytes

    @property
    def megapixels(self) -> float:
        return (self.entry.width or 0) * (self.entry.height or 0) / 1e6


@dataclass(slots=True)
class KindStats:
    count: int = 0
    cpu_ms_per_image: float = 0.0
    cpu_share: float = 0.0
    mean_mpix: float = 0.0


@dataclass(slots=True)
class RunResult:
    name: str
    reduced_jpeg_decode: bool
    threads: int
    work: str  # "process" (probe + process) or "sample" (+ exif_json + sha256)
    images: int
    failures: int
    wall_s: float
    images_per_s: float
    cpu_ms_per_image: float
    cpu_cores_used: float
    other_cpu_cores: float
    per_kind: dict[str, KindStats] = field(default_factory=dict)


def load_images(
    corpus: Path, limit: int | None, kinds: Sequence[str] = GOOD_KINDS, seed: int = 0
) -> list[Image]:
    """The good images' bytes, in a seeded shuffled order so that every thread gets the corpus's mix."""
    root = corpus_dir(corpus)
    entries = [e for e in load_corpus(corpus) if e.good and e.kind in kinds]
    order = np.random.default_rng(seed).permutation(len(entries))
    if limit is not None:
        order = order[:limit]
    return [Image(entries[i], (root / entries[i].path).read_bytes()) for i in order]


def _busy_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine since boot, from /proc/stat's "cpu" line."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields[:8]) - idle, sum(fields[:8])


def _settings(reduced: bool) -> ImageSettings:
    return ImageSettings(
        image_size=256,
        resize_mode="border",
        encode_format="jpg",
        encode_quality=95,
        reduced_jpeg_decode=reduced,
    )


def _work(processor: ImageProcessor, work: str) -> Callable[[bytes], None]:
    if work == "process":

        def process(raw: bytes) -> None:
            processor.process(raw, probe(raw))

        return process

    def sample(raw: bytes) -> None:
        # What _SampleWorker does with the bytes of a successful download (shard.py).
        header = probe(raw)
        processor.process(raw, header)
        exif_json(raw, header)
        digest(raw, "sha256")

    return sample


def run(images: Sequence[Image], name: str, reduced: bool, threads: int, work: str = "process") -> RunResult:
    """Process every image once on ``threads`` threads; wall time, process CPU and per-kind thread CPU."""
    processor = ImageProcessor(_settings(reduced))
    fn = _work(processor, work)
    for image in images[:WARMUP]:
        fn(image.raw)
    counter = itertools.count()  # next() on it is atomic under the GIL: a lock-free work queue
    per_thread: list[list[tuple[int, float]]] = [[] for _ in range(threads)]
    failures: list[int] = []

    def worker(out: list[tuple[int, float]]) -> None:
        n = len(images)
        while (i := next(counter)) < n:
            start = time.thread_time()
            try:
                fn(images[i].raw)
            except ImageError:
                failures.append(i)
            out.append((i, time.thread_time() - start))

    pool = [threading.Thread(target=worker, args=(out,)) for out in per_thread]
    busy0, total0 = _busy_ticks()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    busy1, total1 = _busy_ticks()
    ncpu = os.cpu_count() or 1
    machine_busy_cores = (busy1 - busy0) / (total1 - total0) * ncpu if total1 > total0 else 0.0
    timings = [item for out in per_thread for item in out]
    thread_cpu = sum(dt for _, dt in timings)
    by_kind: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for i, dt in timings:
        by_kind[images[i].entry.kind].append((i, dt))
    per_kind = {}
    for kind in GOOD_KINDS:
        items = by_kind.get(kind, [])
        if items:
            spent = sum(dt for _, dt in items)
            per_kind[kind] = KindStats(
                count=len(items),
                cpu_ms_per_image=round(1000 * spent / len(items), 3),
                cpu_share=round(spent / thread_cpu, 4),
                mean_mpix=round(statistics.fmean(images[i].megapixels for i, _ in items), 3),
            )
    return RunResult(
        name=name,
        reduced_jpeg_decode=reduced,
        threads=threads,
        work=work,
        images=len(images),
        failures=len(failures),
        wall_s=round(wall, 3),
        images_per_s=round(len(images) / wall, 1),
        cpu_ms_per_image=round(1000 * cpu / len(images), 3),
        cpu_cores_used=round(cpu / wall, 3),
        other_cpu_cores=round(max(0.0, machine_busy_cores - cpu / wall), 3),
        per_kind=per_kind,
    )


def stage_costs(images: Sequence[Image]) -> dict[str, float]:
    """One thread, ms per image of probe(), exif_json() (with and without an EXIF block) and sha256."""
    probe_s: list[float] = []
    exif_with: list[float] = []
    exif_without: list[float] = []
    sha: list[float] = []
    for image in images:
        raw = image.raw
        t0 = time.perf_counter()
        header = probe(raw)
        t1 = time.perf_counter()
        exif_json(raw, header)
        t2 = time.perf_counter()
        hashlib.sha256(raw).hexdigest()
        t3 = time.perf_counter()
        probe_s.append(t1 - t0)
        (exif_with if header is not None and header.has_exif else exif_without).append(t2 - t1)
        sha.append(t3 - t2)
    mib = sum(len(i.raw) for i in images) / 2**20

    def ms(values: list[float]) -> float:
        return round(1000 * statistics.fmean(values), 4) if values else 0.0

    return {
        "images": len(images),
        "images_with_exif": len(exif_with),
        "probe_ms": ms(probe_s),
        "exif_ms_per_image": ms(exif_with + exif_without),
        "exif_ms_with_exif": ms(exif_with),
        "exif_ms_without_exif": ms(exif_without),
        "sha256_ms_per_image": ms(sha),
        "sha256_mib_per_s": round(mib / sum(sha), 1) if sum(sha) else 0.0,
    }


def _median_run(images: Sequence[Image], rounds: int, *args: Any) -> RunResult:
    results = sorted((run(images, *args) for _ in range(rounds)), key=lambda r: r.wall_s)
    return results[len(results) // 2]


def _print_run(r: RunResult) -> None:
    print(
        f"{r.name:<28} {r.images_per_s:>8.1f} img/s  {r.cpu_ms_per_image:>6.2f} CPU ms/img  "
        f"{r.cpu_cores_used:>4.2f} cores  other cores {r.other_cpu_cores:.2f}"
        + (f"  FAILURES {r.failures}" if r.failures else "")
    )
    cells = "  ".join(
        f"{kind} {k.cpu_ms_per_image:.2f} ms ({100 * k.cpu_share:.0f}%)" for kind, k in r.per_kind.items()
    )
    print(f"{'':<28} {cells}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.cpu_ceiling", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--corpus", type=Path, default=Path("benchmarks/.corpus"))
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--limit", type=int, help="use only this many images")
    parser.add_argument("--rounds", type=int, default=1, help="repeat each run, keep the median")
    parser.add_argument(
        "--kinds",
        default=",".join(GOOD_KINDS),
        help=f"comma-separated image kinds to use (default all: {','.join(GOOD_KINDS)})",
    )
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)

    cv2.setNumThreads(1)  # as engine.runtime.prepare_process does: the threads are the parallelism
    started = time.perf_counter()
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = sorted(set(kinds) - set(GOOD_KINDS))
    if unknown:
        parser.error(f"unknown kinds {unknown}; the kinds are {list(GOOD_KINDS)}")
    images = load_images(args.corpus, args.limit, kinds)
    if not images:
        parser.error("no images to process")
    counts = {kind: sum(i.entry.kind == kind for i in images) for kind in kinds}
    size = sum(len(i.raw) for i in images)
    mean_mpix = statistics.fmean(i.megapixels for i in images)
    print(
        f"{len(images)} images, {size / 2**20:.0f} MiB, mean {mean_mpix:.2f} MPix,"
        f" loaded in {time.perf_counter() - started:.1f} s: {counts}"
    )
    n = args.threads
    plan = [
        (f"full decode, {n} threads", False, n, "process"),
        (f"reduced decode, {n} threads", True, n, "process"),
        ("full decode, 1 thread", False, 1, "process"),
        ("reduced decode, 1 thread", True, 1, "process"),
        (f"whole sample, {n} threads", True, n, "sample"),
    ]
    runs = []
    for name, reduced, threads, work in plan:
        result = _median_run(images, args.rounds, name, reduced, threads, work)
        _print_run(result)
        runs.append(result)
    stages = stage_costs(images)
    print(
        f"one thread, per image: probe {stages['probe_ms']:.3f} ms,"
        f" exif_json {stages['exif_ms_per_image']:.3f} ms"
        f" ({stages['exif_ms_with_exif']:.3f} ms for the {stages['images_with_exif']} with EXIF,"
        f" {stages['exif_ms_without_exif']:.4f} ms without), sha256 {stages['sha256_ms_per_image']:.3f} ms"
        f" ({stages['sha256_mib_per_s']:.0f} MiB/s)"
    )
    if args.json:
        report = {
            "machine": machine(),
            "corpus": {
                "path": str(args.corpus),
                "kinds": kinds,
                "images": len(images),
                "bytes": size,
                "per_kind": counts,
                "mean_mpix": round(mean_mpix, 3),
            },
            # Infinite limits as "inf": JSON has no infinity.
            "settings": {
                k: "inf" if v == float("inf") else v
                for k, v in asdict(_settings(True)).items()
                if k != "reduced_jpeg_decode"
            },
            "runs": [asdict(r) for r in runs],
            "stages": stages,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
