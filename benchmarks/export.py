"""The bucketed export's throughput: a bucket-mode download of the corpus, then ``export_buckets``
on it, timed three ways: the first export, a re-export with nothing changed, and a re-export after
the last shard is added (a shard that finished after the first export).

    python -m benchmarks.export --corpus benchmarks/.corpus-jpeg-heavy --count 10000

Reported: samples regrouped per second (wall and CPU), the tars written and kept.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from img2ds_dagster import download, export_buckets

from .corpus import load_corpus, write_url_list
from .server import serve_corpus

ROOT = Path(__file__).resolve().parent


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed_export(source: Path, dest: Path, samples_per_tar: int) -> dict[str, Any]:
    wall, cpu = time.perf_counter(), _cpu()
    report = export_buckets(str(source), str(dest), samples_per_tar=samples_per_tar)
    wall, cpu = time.perf_counter() - wall, _cpu() - cpu
    samples = report.manifest["totals"]["samples"]
    return {
        "samples": samples,
        "seconds": round(wall, 2),
        "samples_per_second": round(samples / wall, 1),
        "cpu_ms_per_sample": round(1000 * cpu / max(1, samples), 3),
        "tars_written": report.tars_written,
        "tars_kept": report.tars_kept,
        "rewrote_all": report.rewrote_all,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--corpus", default=str(ROOT / ".corpus"))
    parser.add_argument("--work", default=str(ROOT / ".work" / "export"))
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--bucket-base", type=int, default=256)
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--samples-per-tar", type=int, default=500)
    parser.add_argument("--json")
    args = parser.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    out, dest = work / "out", work / "export"
    with serve_corpus(Path(args.corpus)) as base_url:
        url_list = work / "urls.parquet"
        write_url_list(load_corpus(Path(args.corpus)), base_url, args.count, url_list)
        download(
            str(url_list),
            output_folder=str(out),
            input_format="parquet",
            caption_col="caption",
            output_format="webdataset",
            resize_mode="bucket",
            bucket_base=args.bucket_base,
            number_sample_per_shard=args.samples_per_shard,
            thread_count=64,
            timeout=10,
        )
    last = sorted(out.glob("*_stats.json"))[-1]
    kept = last.read_bytes()
    last.unlink()  # the last shard "not finished yet" for the first export
    report = {"urls": args.count, "bucket_base": args.bucket_base, "samples_per_tar": args.samples_per_tar}
    report["first_export_without_last_shard"] = timed_export(out, dest, args.samples_per_tar)
    last.write_bytes(kept)
    report["re_export_after_last_shard"] = timed_export(out, dest, args.samples_per_tar)
    report["re_export_unchanged"] = timed_export(out, dest, args.samples_per_tar)
    report["fresh_export"] = timed_export(out, work / "fresh", args.samples_per_tar)
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
