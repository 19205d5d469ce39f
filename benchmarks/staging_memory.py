"""Staging's peak memory against the URL file's length: a parquet file of N rows (url and caption,
LAION-like lengths) staged at 10,000 rows per shard in a fresh process, its tree's peak RSS and the
time taken. Staging reads the file by batches, so the peak should not grow with N.

    .venv/bin/python -m benchmarks.staging_memory --rows 1000000,10000000 \\
        --json benchmarks/results/staging_memory.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.measure import run_measured
from benchmarks.side_by_side import ROOT

STAGE = """
import sys
from img2ds_dagster.engine.runtime import prepare_process
from img2ds_dagster.engine.settings import DownloadSettings
from img2ds_dagster.engine.sources import Staging
prepare_process()  # as in the code location's processes and download()
settings = DownloadSettings.from_flags(caption_col="caption", number_sample_per_shard=10000)
manifest = Staging(sys.argv[2]).stage("t", sys.argv[1], settings, sys.argv[3])
print(manifest.row_count, manifest.shard_count)
"""
CHUNK = 500_000


def url_file(path: Path, rows: int) -> Path:
    """A parquet file of ``rows`` rows, written a chunk at a time (made once, then reused)."""
    if path.exists() and pq.ParquetFile(path).metadata.num_rows == rows:
        return path
    schema = pa.schema([("url", pa.string()), ("caption", pa.string())])
    with pq.ParquetWriter(path, schema, compression="zstd") as writer:
        for start in range(0, rows, CHUNK):
            ids = range(start, min(rows, start + CHUNK))
            writer.write_table(
                pa.table(
                    {
                        "url": [
                            f"https://images.example-{i % 9973}.com/photos/{i:012d}/large.jpg" for i in ids
                        ],
                        "caption": [
                            f"a photo number {i} of something, with a caption of some length" for i in ids
                        ],
                    },
                    schema=schema,
                )
            )
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="1000000,10000000")
    parser.add_argument("--work", default=str(ROOT / ".work"))
    parser.add_argument("--json")
    args = parser.parse_args()
    work = Path(args.work) / "staging_memory"
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for rows in (int(n) for n in args.rows.split(",")):
        source = url_file(work / f"urls_{rows}.parquet", rows)
        staging = work / "staging"
        shutil.rmtree(staging, ignore_errors=True)
        measured = run_measured(
            [sys.executable, "-c", STAGE, str(source), str(staging), str(work / "out")], cwd=ROOT.parent
        )
        if measured.returncode != 0:
            raise SystemExit(measured.output)
        result = {
            "rows": rows,
            "file_mb": source.stat().st_size / 1e6,
            "seconds": measured.wall_seconds,
            "peak_rss_mb": measured.peak_rss_mb,
            "bytes_per_row_at_peak": measured.peak_rss_bytes / rows,
        }
        results.append(result)
        print(json.dumps(result), flush=True)
    shutil.rmtree(work / "staging", ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
