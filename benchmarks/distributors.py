"""What each distributor costs against the in-process one: ``download()`` of the same URL list with
``distributor="multiprocessing"``, ``"ray"`` (a Ray started on this machine, ``ray_address="local"``)
and ``"pyspark"`` (``spark_master="local[2]"``), each in a fresh process.

A 2-core machine cannot show a cluster's speed-up; what it shows is the overhead: the start-up
(until the first shard starts: the engine's start, Ray's or Spark's included), the shard phase
(first shard start to last shard end, from the stats files), and the CPU per image. CPU is counted
for the whole machine (/proc/stat, busy time) minus nginx's, since Ray's and Spark's workers are
not children that the run waits for.

    .venv/bin/python -m benchmarks.distributors --count 10000 --json benchmarks/results/distributors_10k.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.corpus import corpus_dir, load_corpus, url_rows
from benchmarks.measure import run_measured
from benchmarks.polite import COMMON
from benchmarks.server import _cpu_seconds, _nginx_pids, _serve
from benchmarks.side_by_side import ROOT, SETTLE_SECONDS, command, outcome

DISTRIBUTORS: dict[str, dict[str, Any]] = {
    "multiprocessing": {},
    "ray": {"ray_address": "local"},
    "pyspark": {"spark_master": "local[2]"},
}


SUMMARIZED = (
    "wall_seconds",
    "startup_seconds",
    "shard_phase_seconds",
    "images_per_second",
    "cpu_ms_per_image",
)


def machine_busy_seconds() -> float:
    """CPU seconds all cores have spent busy since boot (not idle, not waiting for I/O)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def shard_phase(out: Path) -> tuple[float, float, int]:
    """(first shard start, last shard end, shards) from the stats files."""
    stats = [json.loads(p.read_text()) for p in out.glob("*_stats.json")]
    return min(s["start_time"] for s in stats), max(s["end_time"] for s in stats), len(stats)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", default=str(ROOT / ".corpus-jpeg-heavy"))
    parser.add_argument("--work", default=str(ROOT / ".work"))
    parser.add_argument("--count", type=int, default=10000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--distributors", default=",".join(DISTRIBUTORS))
    parser.add_argument("--json")
    args = parser.parse_args()
    corpus = corpus_dir(args.corpus).resolve()
    work = Path(args.work) / "distributors"
    work.mkdir(parents=True, exist_ok=True)
    names = args.distributors.split(",")
    runs: list[dict[str, Any]] = []
    with _serve(corpus, 0, 1) as (base, nginx):
        rows = url_rows(load_corpus(corpus), base, args.count)
        urls = work / "urls.parquet"
        pq.write_table(pa.table({"url": [u for u, _ in rows], "caption": [c for _, c in rows]}), urls)
        for round_ in range(args.rounds):
            for name in names if round_ % 2 == 0 else names[::-1]:
                out = work / name
                shutil.rmtree(out, ignore_errors=True)
                os.sync()
                time.sleep(SETTLE_SECONDS)
                options = {
                    **COMMON,
                    **DISTRIBUTORS[name],
                    "distributor": name,
                    "url_list": str(urls),
                    "output_folder": str(out),
                }
                nginx_before, busy_before = _cpu_seconds(_nginx_pids(nginx.pid)), machine_busy_seconds()
                started = time.time()
                measured = run_measured(
                    command("download", options, Path()), env=dict(os.environ), cwd=ROOT.parent
                )
                busy = machine_busy_seconds() - busy_before
                busy -= _cpu_seconds(_nginx_pids(nginx.pid)) - nginx_before
                if measured.returncode != 0:
                    raise SystemExit(f"{name} failed:\n{measured.output}")
                first, last, shards = shard_phase(out)
                successes = outcome(out)["success"]
                run = {
                    "distributor": name,
                    "round": round_,
                    "wall_seconds": measured.wall_seconds,
                    "startup_seconds": first - started,
                    "shard_phase_seconds": last - first,
                    "shards": shards,
                    "successes": successes,
                    "images_per_second": successes / measured.wall_seconds,
                    "shard_phase_images_per_second": successes / (last - first),
                    "cpu_ms_per_image": 1000 * busy / max(1, successes),
                }
                runs.append(run)
                print(
                    f"round {round_} {name:<16} wall {run['wall_seconds']:5.1f}s, start-up "
                    f"{run['startup_seconds']:4.1f}s, shards {run['shard_phase_seconds']:5.1f}s, "
                    f"{run['images_per_second']:5.1f} images/s, {run['cpu_ms_per_image']:.2f} CPU ms/image",
                    flush=True,
                )
    summary: dict[str, Any] = {}
    for name in names:
        mine = [r for r in runs if r["distributor"] == name]
        summary[name] = {key: statistics.median(r[key] for r in mine) for key in SUMMARIZED}
    local = summary.get("multiprocessing")
    for name, row in summary.items():
        if local is not None and name != "multiprocessing":
            shards = runs[0]["shards"]
            row["overhead_per_shard_seconds"] = (
                row["shard_phase_seconds"] - local["shard_phase_seconds"]
            ) / shards
            row["cpu_per_image_vs_in_process"] = row["cpu_ms_per_image"] / local["cpu_ms_per_image"]
        print(name, json.dumps(row))
    if args.json:
        Path(args.json).write_text(
            json.dumps({"count": args.count, "runs": runs, "summary": summary}, indent=2) + "\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
