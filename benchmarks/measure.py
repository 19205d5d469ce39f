"""Run a command and measure its whole process tree: wall time, CPU time, peak resident memory.

CPU time comes from ``getrusage(RUSAGE_CHILDREN)`` around the run, which includes every descendant
that was waited for (multiprocessing workers are). Peak memory is the largest sum of the RSS of all
live processes of the tree, sampled from /proc every ``interval`` seconds (cheaply: the sampler
must not compete for the cores it measures).
"""

from __future__ import annotations

import os
import resource
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class Measurement:
    wall_seconds: float
    cpu_seconds: float
    peak_rss_bytes: int
    returncode: int
    output: str  # stdout and stderr, last 4000 characters

    @property
    def peak_rss_mb(self) -> float:
        return self.peak_rss_bytes / 1e6


def _children(pid: int) -> list[int]:
    # Each thread's children file lists the processes it started; no scan of all of /proc, which
    # on a 2-core machine would steal CPU from the command being measured.
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def tree_rss(root: int) -> int:
    """Sum of the resident set sizes of ``root`` and all its descendants, in bytes."""
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
        except (OSError, IndexError, ValueError):
            continue
        stack.extend(_children(pid))
    return total


def run_measured(
    command: Sequence[str],
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    interval: float = 0.2,
    timeout: float = 3600,
) -> Measurement:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    process = subprocess.Popen(
        list(command),
        env=None if env is None else dict(env),
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    peak = 0
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(process.stdout or []), daemon=True)
    reader.start()
    while process.poll() is None:
        peak = max(peak, tree_rss(process.pid))
        if time.monotonic() - started > timeout:
            process.kill()
        time.sleep(interval)
    wall = time.monotonic() - started
    reader.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return Measurement(wall, cpu, peak, process.returncode, "".join(output)[-4000:])
