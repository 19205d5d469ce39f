"""From a URL file dropped in the inbox to its dataset, through the Dagster daemon, as ``make dev``
runs it: the project's dagster.yaml and code location on a fresh instance, the demo's sample photos
served on 127.0.0.1, and the demo's URL list (10 rows) copied into the inbox.

    python -m benchmarks.inbox_latency --rounds 3

Reported per round, in seconds after the copy: the table's partition registered, the table staged,
and every shard materialized.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg

from img2ds_dagster.demo import serve_samples, write_url_file

ROOT = Path(__file__).resolve().parents[1]


def wait_for(what: str, check: Any, deadline: float) -> float:
    while time.monotonic() < deadline:
        if check():
            return time.monotonic()
        time.sleep(0.1)
    raise SystemExit(f"timed out waiting for {what}")


def one_round(work: Path, base_url: str, table: str) -> dict[str, float]:
    inbox = work / "inbox"
    url_file = work / f"{table}.csv"
    write_url_file(url_file, base_url)
    with dg.DagsterInstance.from_config(str(work / "home")) as instance:
        start = time.monotonic()
        deadline = start + 300
        shutil.copy(url_file, inbox / url_file.name)
        registered = wait_for(
            "the partition", lambda: table in instance.get_dynamic_partitions("url_tables"), deadline
        )

        def staged() -> bool:
            return bool(
                instance.fetch_materializations(
                    dg.AssetRecordsFilter(asset_key=dg.AssetKey("url_tables"), asset_partitions=[table]),
                    limit=1,
                ).records
            )

        staged_at = wait_for("the staging", staged, deadline)
        keys = [k for k in instance.get_dynamic_partitions("shards") if k.startswith(f"{table}/")]

        def built() -> bool:
            done = instance.get_materialized_partitions(dg.AssetKey("shards"))
            return set(keys) <= set(done)

        built_at = wait_for("the shards", built, deadline)
    return {
        "registered": round(registered - start, 2),
        "staged": round(staged_at - start, 2),
        "shards_built": round(built_at - start, 2),
        "shards": len(keys),
    }


@contextlib.contextmanager
def project_daemon(work: Path, dagster_yaml: str) -> Iterator[None]:
    """``dagster-daemon run`` on the project's code location, as ``make dev`` starts it, over a fresh
    instance in ``work/home`` with this dagster.yaml, its inbox, staging and datasets under ``work``
    (this process's DAGSTER_HOME set to the same instance). Stopped on exit with the run processes
    it launched, which do not stop with it."""
    home = work / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text(dagster_yaml)
    (work / "inbox").mkdir()
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "IMG2DS_DAGSTER_STORAGE": str(work / "storage"),
        "IMG2DS_INBOX": str(work / "inbox"),
        "IMG2DS_STAGING": str(work / "staging"),
        "IMG2DS_DATASETS": str(work / "datasets"),
    }
    os.environ.update({k: env[k] for k in ("DAGSTER_HOME", "IMG2DS_DAGSTER_STORAGE")})
    daemon = subprocess.Popen(
        [str(Path(sys.executable).parent / "dagster-daemon"), "run", "-w", str(ROOT / "workspace.yaml")],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its runs' processes in its group, to be stopped together
    )
    try:
        time.sleep(10)  # the daemon loads the code location and takes its first ticks
        yield
    finally:
        os.killpg(daemon.pid, signal.SIGKILL)
        daemon.wait(60)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="img2ds-inbox-latency-") as tmp, serve_samples() as base_url:
        work = Path(tmp)
        with project_daemon(work, (ROOT / "dagster.yaml").read_text()):
            rounds = [one_round(work, base_url, f"drop{i}") for i in range(args.rounds)]
    for r in rounds:
        print(r)
    report = {
        "rounds": rounds,
        "median": {
            k: statistics.median(r[k] for r in rounds) for k in ("registered", "staged", "shards_built")
        },
    }
    print(json.dumps(report["median"]))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
