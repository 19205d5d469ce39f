"""What each distributor costs against the in-process one: ``download()`` of the same URL list with
``distributor="multiprocessing"``, ``"ray"`` (a Ray started on this machine, ``ray_address="local"``)
and ``"pyspark"`` (``spark_master="local[2]"``), each in a fresh process.

A 2-core machine cannot show a cluster's speed-up; what it shows is the overhead: the start-up
(until the first shard starts: the engine's start, Ray's or Spark's included), the shard phase
(first shard start to last shard end, from the stats files), and the CPU per image. CPU is counted
for the whole machine (/proc/stat, busy time) minus nginx's and the benchmark's own, since Ray's and
Spark's workers are not children that the run waits for: over the whole call, and over the shard
phase alone (sampled every 0.1 s), which leaves out the cluster's start and stop, paid once by a
cluster that outlives its calls. The shard phase's CPU is also split by kind of process (sampled
every 0.5 s): the processes that build the shards (the download() process itself in-process, Ray's
task workers, PySpark's Python workers), the engine's own (Ray's GCS, raylet, agents and monitors;
Spark's JVMs) and the download() process as the driver. On a real cluster the first two are spread
over its nodes and the driver is one process: which of them grows is what the split tells.

    .venv/bin/python -m benchmarks.distributors --count 10000 --json benchmarks/results/distributors_10k.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Generic, Self, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.corpus import corpus_dir, load_corpus, url_rows
from benchmarks.measure import machine, run_measured
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
    "shard_phase_cpu_ms_per_image",
)


def machine_busy_seconds() -> float:
    """CPU seconds all cores have spent busy since boot (not idle, not waiting for I/O)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


_V = TypeVar("_V")


class Sampling(Generic[_V]):
    """``(time, value)`` every ``interval`` seconds while ``running()``, from ``_value()``."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.points: list[tuple[float, _V]] = []
        self._stop = threading.Event()

    def _value(self) -> _V:
        raise NotImplementedError

    def _sample(self) -> None:
        self.points.append((time.time(), self._value()))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    @contextmanager
    def running(self) -> Iterator[Self]:
        self._sample()
        thread = threading.Thread(target=self._run, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join()
            self._sample()


class BusyTimeline(Sampling[float]):
    """The machine's busy seconds minus nginx's, every ``interval`` seconds, so that the CPU spent
    between two moments known only afterwards (the shard phase) can be read off."""

    def __init__(self, nginx_pid: int, interval: float = 0.1) -> None:
        super().__init__(interval)
        self.nginx_pids = _nginx_pids(nginx_pid)

    def _value(self) -> float:
        # This process's own CPU (its samplers: reading every process's /proc files costs more when
        # Ray's or Spark's processes are there) is the measurer's, not the run's.
        return machine_busy_seconds() - _cpu_seconds(self.nginx_pids) - time.process_time()

    def at(self, moment: float) -> float:
        """Busy seconds at ``moment``, interpolated between the samples around it."""
        before = max((p for p in self.points if p[0] <= moment), default=self.points[0])
        after = min((p for p in self.points if p[0] >= moment), default=self.points[-1])
        if after[0] == before[0]:
            return before[1]
        share = (moment - before[0]) / (after[0] - before[0])
        return before[1] + share * (after[1] - before[1])

    def between(self, start: float, end: float) -> float:
        return self.at(end) - self.at(start)


# What a process is, from its command line: the processes that build shards (the download() process
# itself when in-process; Ray's task workers; PySpark's Python workers), the engine's own (Ray's
# GCS, raylet, agents and monitors; Spark's JVMs) and the download() process when it only drives.
def process_kind(cmdline: str) -> str:
    # A Ray worker is started as default_worker.py, then names itself ray::IDLE or ray::<task>.
    if (cmdline.startswith("ray::") and "Agent" not in cmdline) or "workers/default_worker.py" in cmdline:
        return "ray workers"
    if "pyspark.daemon" in cmdline or "pyspark/daemon.py" in cmdline or "pyspark.worker" in cmdline:
        return "spark python workers"
    if "benchmarks.tools" in cmdline:
        return "download() process"
    if "benchmarks.distributors" in cmdline:
        return "this benchmark"
    if "/ray/" in cmdline or cmdline.startswith("ray::"):
        return "ray daemons"
    if "java" in cmdline.split(" ", 1)[0]:
        return "spark jvms"
    if cmdline.startswith("nginx"):
        return "nginx"
    return "other"


def process_cpu() -> dict[int, tuple[str, float]]:
    """Every live process's kind (``process_kind``) and CPU seconds (user + system)."""
    ticks = os.sysconf("SC_CLK_TCK")
    found: dict[int, tuple[str, float]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        found[int(entry.name)] = (process_kind(cmdline.strip()), (int(fields[11]) + int(fields[12])) / ticks)
    return found


class KindTimeline(Sampling[dict[str, float]]):
    """The CPU seconds of each kind of process (``process_kind``) every ``interval`` seconds (reading
    every process's /proc files costs a few ms, so less often than BusyTimeline), for the CPU each
    kind spent in the shard phase. A process that has ended counts with its CPU when last seen."""

    def __init__(self, interval: float = 0.5) -> None:
        super().__init__(interval)
        self._seen: dict[int, tuple[str, float]] = {}

    def _value(self) -> dict[str, float]:
        self._seen.update(process_cpu())
        totals: dict[str, float] = {}
        for kind, seconds in self._seen.values():
            totals[kind] = totals.get(kind, 0.0) + seconds
        return totals

    def between(self, start: float, end: float) -> dict[str, float]:
        """CPU seconds per kind from the last sample before ``start`` to the first after ``end``,
        scaled to the phase's length."""
        before = max((p for p in self.points if p[0] <= start), default=self.points[0], key=lambda p: p[0])
        after = min((p for p in self.points if p[0] >= end), default=self.points[-1], key=lambda p: p[0])
        share = (end - start) / max(1e-9, after[0] - before[0])
        return {
            kind: round(share * (seconds - before[1].get(kind, 0.0)), 3) for kind, seconds in after[1].items()
        }


def shard_phase(out: Path) -> tuple[float, float, int]:
    """(first shard start, last shard end, shards) from the stats files."""
    stats = [json.loads(p.read_text()) for p in out.glob("*_stats.json")]
    return min(s["start_time"] for s in stats), max(s["end_time"] for s in stats), len(stats)


def round_ratios(runs: list[dict[str, Any]], name: str, key: str) -> list[float]:
    """``key`` of each round's ``name`` run over the same round's in-process run, sorted."""
    local = {r["round"]: r[key] for r in runs if r["distributor"] == "multiprocessing"}
    return sorted(
        round(r[key] / local[r["round"]], 3) for r in runs if r["distributor"] == name and r["round"] in local
    )


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
                started = time.time()
                with BusyTimeline(nginx.pid).running() as timeline, KindTimeline().running() as kinds:
                    measured = run_measured(
                        command("download", options, Path()), env=dict(os.environ), cwd=ROOT.parent
                    )
                if measured.returncode != 0:
                    raise SystemExit(f"{name} failed:\n{measured.output}")
                busy = timeline.points[-1][1] - timeline.points[0][1]
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
                    "shard_phase_cpu_ms_per_image": 1000 * timeline.between(first, last) / max(1, successes),
                    "shard_phase_cpu_ms_per_image_by_process": {
                        kind: round(1000 * seconds / max(1, successes), 3)
                        for kind, seconds in kinds.between(first, last).items()
                        if seconds > 0 and kind not in ("nginx", "this benchmark", "other")
                    },
                    "kind_samples_in_shard_phase": sum(first <= t <= last for t, _ in kinds.points),
                }
                runs.append(run)
                print(
                    f"round {round_} {name:<16} wall {run['wall_seconds']:5.1f}s, start-up "
                    f"{run['startup_seconds']:4.1f}s, shards {run['shard_phase_seconds']:5.1f}s, "
                    f"{run['images_per_second']:5.1f} images/s, {run['cpu_ms_per_image']:.2f} CPU ms/image "
                    f"({run['shard_phase_cpu_ms_per_image']:.2f} in the shard phase: "
                    f"{run['shard_phase_cpu_ms_per_image_by_process']})",
                    flush=True,
                )
    summary: dict[str, Any] = {}
    for name in names:
        mine = [r for r in runs if r["distributor"] == name]
        summary[name] = {key: statistics.median(r[key] for r in mine) for key in SUMMARIZED}
        seen = {kind for r in mine for kind in r["shard_phase_cpu_ms_per_image_by_process"]}
        summary[name]["shard_phase_cpu_ms_per_image_by_process"] = {
            kind: statistics.median(r["shard_phase_cpu_ms_per_image_by_process"].get(kind, 0.0) for r in mine)
            for kind in sorted(seen)
        }
    local = summary.get("multiprocessing")
    for name, row in summary.items():
        if local is not None and name != "multiprocessing":
            shards = runs[0]["shards"]
            row["overhead_per_shard_seconds"] = (
                row["shard_phase_seconds"] - local["shard_phase_seconds"]
            ) / shards
            row["cpu_per_image_vs_in_process"] = row["cpu_ms_per_image"] / local["cpu_ms_per_image"]
            row["shard_phase_cpu_per_image_vs_in_process"] = (
                row["shard_phase_cpu_ms_per_image"] / local["shard_phase_cpu_ms_per_image"]
            )
            # The machine's speed drifts between rounds more than the distributors differ: each
            # round's ratio is against the in-process run of the same round.
            row["shard_phase_cpu_ratio_by_round"] = round_ratios(runs, name, "shard_phase_cpu_ms_per_image")
        print(name, json.dumps(row))
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"machine": machine(), "count": args.count, "runs": runs, "summary": summary}, indent=2
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
