"""img2dataset 1.47 and img2ds_dagster side by side, on the same URL list, same settings, same
machine, alternating over several rounds.

    python -m benchmarks.side_by_side --count 5000 --rounds 3
    python -m benchmarks.side_by_side --tools dagster,dagster:bucket   # what bucket mode costs

A tool named ``<tool>:bucket`` is that tool with ``resize_mode="bucket"`` at ``--bucket-base``
(default 256, the image_size of the others, so both make images of about the same area).

Each tool runs in a fresh process; the report gives, per tool, images/s (successful images over wall
time), CPU milliseconds per successful image and the peak RSS and PSS of its whole process tree
(``measure.py`` says why both), then the ratio of each img2ds_dagster path to img2dataset
(min/median/max over rounds), and checks that both tools agree on which URLs succeed, on output
sizes, and on pixels (PSNR).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pyarrow.parquet as pq

from .corpus import load_corpus, write_url_list
from .measure import Measurement, machine, run_measured
from .server import serve_corpus
from .tools import IMG2DATASET_SCRIPT

ROOT = Path(__file__).resolve().parent
TOOLS = ("img2dataset", "download", "dagster")
SETTLE_SECONDS = 2.0


@dataclass
class Run:
    tool: str
    round: int
    wall_seconds: float
    cpu_seconds: float
    peak_rss_mb: float
    peak_pss_mb: float
    successes: int
    failed_to_download: int
    failed_to_resize: int

    @property
    def images_per_second(self) -> float:
        return self.successes / self.wall_seconds

    @property
    def cpu_ms_per_image(self) -> float:
        return 1000 * self.cpu_seconds / max(1, self.successes)


def ensure_img2dataset(venv: Path) -> Path:
    """img2dataset 1.47.0 in its own virtualenv (its dependencies conflict with ours)."""
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"installing img2dataset 1.47.0 into {venv} ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "img2dataset==1.47.0"], check=True)
    return python


def command(tool: str, options: dict[str, Any], img2dataset_python: Path) -> list[str]:
    tool, _, variant = tool.partition(":")
    if variant == "bucket":
        options = {**options, "resize_mode": "bucket", "bucket_base": options.pop("bucket_base")}
    else:
        options = {k: v for k, v in options.items() if k != "bucket_base"}
    if tool == "img2dataset":
        return [str(img2dataset_python), "-c", IMG2DATASET_SCRIPT, json.dumps(options)]
    return [sys.executable, "-m", "benchmarks.tools", tool, json.dumps(options)]


def outcome(folder: Path) -> dict[str, int]:
    counts = {"success": 0, "failed_to_download": 0, "failed_to_resize": 0}
    for path in folder.glob("*.parquet"):
        for status in pq.read_table(path, columns=["status"]).column("status").to_pylist():
            counts[status] += 1
    return counts


def run_once(tool: str, round_: int, options: dict[str, Any], work: Path, python: Path) -> Run:
    out = work / tool.replace(":", "-")
    shutil.rmtree(out, ignore_errors=True)
    # The previous run's output is still being written back (and this one's old output freed): done
    # now, and the disk left to settle, so that neither is charged to this tool.
    os.sync()
    time.sleep(SETTLE_SECONDS)
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    measured: Measurement = run_measured(
        command(tool, {**options, "output_folder": str(out)}, python), env=env, cwd=ROOT.parent
    )
    if measured.returncode != 0:
        raise SystemExit(f"{tool} failed ({measured.returncode}):\n{measured.output}")
    counts = outcome(out)
    run = Run(
        tool,
        round_,
        measured.wall_seconds,
        measured.cpu_seconds,
        measured.peak_rss_mb,
        measured.peak_pss_mb,
        counts["success"],
        counts["failed_to_download"],
        counts["failed_to_resize"],
    )
    print(
        f"round {round_} {tool:<12} {run.images_per_second:7.1f} images/s  "
        f"{run.cpu_ms_per_image:5.2f} CPU ms/image  "
        f"RSS {run.peak_rss_mb:4.0f} MB  PSS {run.peak_pss_mb:4.0f} MB  "
        f"{run.successes} ok in {run.wall_seconds:.1f}s",
        flush=True,
    )
    return run


def samples_by_url(folder: Path) -> dict[str, dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    for path in sorted(folder.glob("*.parquet")):
        for row in pq.read_table(path).to_pylist():
            rows[row["url"]] = {**row, "shard": path.stem}
    return rows


def images(folder: Path, rows: dict[str, dict[str, Any]]) -> dict[str, np.ndarray]:
    wanted = {f"{r['key']}.jpg": url for url, r in rows.items() if r["status"] == "success"}
    found: dict[str, np.ndarray] = {}
    for tar_path in sorted(folder.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar:
                if member.name in wanted:
                    data = tar.extractfile(member).read()  # type: ignore[union-attr]
                    found[wanted[member.name]] = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    return found


def psnr_db(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR of two 8-bit images of the same shape; 99 dB for identical ones."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 99.0 if mse == 0 else float(10 * np.log10(255**2 / mse))


def agreement(reference: Path, candidate: Path) -> dict[str, Any]:
    """Do both outputs agree on which URLs succeed, on sizes, and (PSNR) on pixels?"""
    ref, cand = samples_by_url(reference), samples_by_url(candidate)
    ok_ref = {u for u, r in ref.items() if r["status"] == "success"}
    ok_cand = {u for u, r in cand.items() if r["status"] == "success"}
    both = ok_ref & ok_cand
    size_mismatch = [
        u
        for u in both
        if (ref[u]["width"], ref[u]["height"], ref[u]["original_width"], ref[u]["original_height"])
        != (cand[u]["width"], cand[u]["height"], cand[u]["original_width"], cand[u]["original_height"])
    ]
    ref_images, cand_images = images(reference, ref), images(candidate, cand)
    psnr = []
    for url in both:
        a, b = ref_images.get(url), cand_images.get(url)
        if a is None or b is None or a.shape != b.shape:
            continue
        psnr.append(psnr_db(a, b))
    return {
        "urls": len(ref),
        "success_in_both": len(both),
        "success_only_in_img2dataset": sorted(ok_ref - ok_cand)[:20],
        "success_only_in_img2ds": sorted(ok_cand - ok_ref)[:20],
        "size_mismatches": sorted(size_mismatch)[:20],
        "psnr_median_db": statistics.median(psnr) if psnr else None,
        "psnr_p5_db": float(np.percentile(psnr, 5)) if psnr else None,
        "psnr_min_db": min(psnr) if psnr else None,
        "images_compared": len(psnr),
    }


def summarize(runs: list[Run]) -> dict[str, Any]:
    by_tool: dict[str, list[Run]] = {}
    for run in runs:
        by_tool.setdefault(run.tool, []).append(run)
    summary: dict[str, Any] = {}
    baseline = {r.round: r for r in by_tool.get("img2dataset", [])}
    for tool, tool_runs in by_tool.items():
        ratios = [
            r.images_per_second / baseline[r.round].images_per_second
            for r in tool_runs
            if r.round in baseline
        ]
        summary[tool] = {
            "images_per_second_median": statistics.median(r.images_per_second for r in tool_runs),
            "cpu_ms_per_image_median": statistics.median(r.cpu_ms_per_image for r in tool_runs),
            "peak_rss_mb_max": max(r.peak_rss_mb for r in tool_runs),
            "peak_pss_mb_max": max(r.peak_pss_mb for r in tool_runs),
            "successes": tool_runs[-1].successes,
            "failures": tool_runs[-1].failed_to_download + tool_runs[-1].failed_to_resize,
            "ratio_to_img2dataset": {
                "min": min(ratios),
                "median": statistics.median(ratios),
                "max": max(ratios),
            }
            if ratios
            else None,
        }
    return summary


def markdown(summary: dict[str, Any], check: dict[str, Any] | None, settings: dict[str, Any]) -> str:
    lines = [
        "| tool | images/s | CPU ms / image | peak RSS (MB) | peak PSS (MB) | successes | failures "
        "| vs img2dataset (min / median / max) |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for tool, s in summary.items():
        ratio = s["ratio_to_img2dataset"]
        shown = f"{ratio['min']:.2f}x / {ratio['median']:.2f}x / {ratio['max']:.2f}x" if ratio else ""
        lines.append(
            f"| {tool} | {s['images_per_second_median']:.0f} | {s['cpu_ms_per_image_median']:.2f} "
            f"| {s['peak_rss_mb_max']:.0f} | {s['peak_pss_mb_max']:.0f} | {s['successes']} | {s['failures']} "
            f"| {shown} |"
        )
    lines.append("")
    lines.append("Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    if check:
        lines.append(
            f"Agreement with img2dataset: {check['success_in_both']} URLs succeed in both, "
            f"{len(check['success_only_in_img2dataset'])} only in img2dataset, "
            f"{len(check['success_only_in_img2ds'])} only in img2ds_dagster, "
            f"{len(check['size_mismatches'])} size mismatches; PSNR median {check['psnr_median_db']:.1f} dB, "
            f"5th percentile {check['psnr_p5_db']:.1f} dB over {check['images_compared']} images."
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--corpus", default=str(ROOT / ".corpus"))
    parser.add_argument("--work", default=str(ROOT / ".work"))
    parser.add_argument("--count", type=int, default=5000, help="URLs in the list")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tools", default=",".join(TOOLS))
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--processes", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--threads", type=int, default=64)
    parser.add_argument("--img2dataset-venv", default=str(ROOT / ".venv-img2dataset"))
    parser.add_argument("--bucket-base", type=int, default=256, help="bucket_base of <tool>:bucket runs")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    tools = args.tools.split(",")
    python = ensure_img2dataset(Path(args.img2dataset_venv)) if "img2dataset" in tools else Path()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    settings = {
        "image_size": 256,
        "resize_mode": "border",
        "output_format": "webdataset",
        "encode_format": "jpg",
        "encode_quality": 95,
        "number_sample_per_shard": args.samples_per_shard,
        "processes_count": args.processes,
        "thread_count": args.threads,
        "input_format": "parquet",
        "caption_col": "caption",
        "timeout": 10,
    }
    entries = load_corpus(Path(args.corpus))
    runs: list[Run] = []
    with serve_corpus(Path(args.corpus)) as base_url:
        url_list = work / "urls.parquet"
        write_url_list(entries, base_url, args.count, url_list)
        options = {**settings, "url_list": str(url_list), "bucket_base": args.bucket_base}
        for round_ in range(args.rounds):
            # Alternate who goes first, so that neither always runs on a warmer machine.
            order = tools if round_ % 2 == 0 else tools[::-1]
            for tool in order:
                runs.append(run_once(tool, round_, options, work, python))
        check = (
            agreement(work / "img2dataset", work / "dagster" if "dagster" in tools else work / "download")
            if "img2dataset" in tools and len(tools) > 1
            else None
        )
    summary = summarize(runs)
    report = markdown(summary, check, {**settings, "urls": args.count, "rounds": args.rounds})
    print("\n" + report)
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "machine": machine(),
                    "runs": [asdict(r) for r in runs],
                    "summary": summary,
                    "agreement": check,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
