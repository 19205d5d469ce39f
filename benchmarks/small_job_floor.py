"""What a small ``download()`` cannot go below: the wall time of fresh processes that only start
Python, that import img2ds_dagster (Dagster, aiohttp, OpenCV, pyarrow with it), and that also open
a new output folder's Dagster instance (sqlite, the instance ``download()`` makes), each with the
heap frozen at exit as ``download()`` does it. Set against img2dataset's wall time on 20 URLs
(``benchmarks.side_by_side --count 20``), half of which is what "2x img2dataset" allows.

    python -m benchmarks.small_job_floor --rounds 7 --json benchmarks/results/small_job_floor.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

IMPORT = (
    "from img2ds_dagster.engine.runtime import prepare_process; prepare_process(); import img2ds_dagster.api"
)
INSTANCE = (
    IMPORT
    + """
import pathlib, tempfile
from img2ds_dagster.api import _instance
with tempfile.TemporaryDirectory() as folder:
    with _instance(pathlib.Path(folder) / ".img2ds") as instance:
        instance.get_dynamic_partitions("url_tables")
"""
)
STEPS = {
    "python": "pass",
    "import img2ds_dagster": IMPORT,
    "import and a new instance": INSTANCE,
}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json")
    args = parser.parse_args()
    walls: dict[str, list[float]] = {step: [] for step in STEPS}
    for _ in range(args.rounds):
        for step, code in STEPS.items():  # interleaved, so that a slow spell of the machine hits all
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
            walls[step].append(time.perf_counter() - start)
    report = {
        step: {
            "median_seconds": round(statistics.median(w), 3),
            "min": round(min(w), 3),
            "max": round(max(w), 3),
        }
        for step, w in walls.items()
    }
    for step, row in report.items():
        print(f"{step:<28} {row['median_seconds']:.2f} s median ({row['min']:.2f}-{row['max']:.2f})")
    if args.json:
        Path(args.json).write_text(json.dumps({"rounds": args.rounds, "steps": report}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
