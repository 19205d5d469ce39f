"""Run a command and measure its whole process tree: wall time, CPU time, peak resident memory.

CPU time comes from ``getrusage(RUSAGE_CHILDREN)`` around the run, which includes every descendant
that was waited for (multiprocessing workers are). Peak memory is the largest sum over all live
processes of the tree, sampled from /proc every ``interval`` seconds (cheaply: the sampler must not
compete for the cores it measures), of their RSS and of their PSS.

RSS counts a page in every process that maps it: a child forked from a 400 MB parent shows 400 MB
until it execs, though it uses no memory of its own yet. PSS (proportional set size) divides each
shared page among the processes sharing it, so the sum is the memory the tree really holds. The
difference matters for img2dataset, whose worker processes are forked, and for Dagster, which starts
two helper processes at every step to capture its output (``tail`` and a watcher).

PSS is not enough for those helpers: Python's subprocess starts them with vfork, and until the exec
the child shares its parent's address space itself, not copies of its pages, so its PSS is the
parent's whole PSS again. A process of 420 MB starting ``true`` in a loop showed a tree of 840 MB
PSS in 3% of the samples. So a child that has its parent's command line and, within 1%, its parent's
RSS is taken for such a child and not counted (a forked worker right after its fork also matches for
an instant, and is counted once it has started to differ). The 625-700 MB peaks seen in some
Dagster-path runs before this rule were probably this.
"""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class Measurement:
    wall_seconds: float
    cpu_seconds: float
    peak_rss_bytes: int
    peak_pss_bytes: int
    returncode: int
    output: str  # stdout and stderr, last 4000 characters

    @property
    def peak_rss_mb(self) -> float:
        return self.peak_rss_bytes / 1e6

    @property
    def peak_pss_mb(self) -> float:
        return self.peak_pss_bytes / 1e6


def _children(pid: int) -> list[int]:
    # Each thread's children file lists the processes it started; no scan of all of /proc, which
    # on a 2-core machine would steal CPU from the command being measured.
    found: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:  # the process has just ended
        return found
    for task in tasks:
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def tree_memory(root: int) -> tuple[int, int]:
    """Sums of the RSS and of the PSS of ``root`` and all its descendants, in bytes, leaving out a
    child still sharing its parent's address space (started by vfork, not yet exec'd)."""
    rss = pss = 0
    stack: list[tuple[int, tuple[bytes, int] | None]] = [(root, None)]
    while stack:
        pid, parent = stack.pop()
        try:
            own_rss = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if not _shares_parent_memory(parent, cmdline, own_rss):
                pss += _pss(pid)
                rss += own_rss
        except (OSError, IndexError, ValueError):
            continue
        stack.extend((child, (cmdline, own_rss)) for child in _children(pid))
    return rss, pss


def _shares_parent_memory(parent: tuple[bytes, int] | None, cmdline: bytes, rss: int) -> bool:
    if parent is None:
        return False
    parent_cmdline, parent_rss = parent
    return cmdline == parent_cmdline and abs(rss - parent_rss) <= parent_rss // 100


def _pss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    raise ValueError(f"no Pss line for process {pid}")


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
    peak_rss = peak_pss = 0
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(process.stdout or []), daemon=True)
    reader.start()
    while process.poll() is None:
        rss, pss = tree_memory(process.pid)
        peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
        if time.monotonic() - started > timeout:
            process.kill()
        time.sleep(interval)
    wall = time.monotonic() - started
    reader.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return Measurement(wall, cpu, peak_rss, peak_pss, process.returncode, "".join(output)[-4000:])


def machine() -> dict[str, Any]:
    """What the figures were measured on: the CPU model (the machine can differ from one session to
    the next), the cores, and the versions of what does the image work."""
    import cv2  # only here: the rest of this module is for processes that may not have it
    import numpy as np

    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    build = cv2.getBuildInformation()
    jpeg = next((line.split(":", 1)[1].strip() for line in build.splitlines() if "JPEG:" in line), "")
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "opencv": cv2.__version__,
        "jpeg_codec": jpeg,
        "numpy": np.__version__,
    }
