"""Whole shards through the engine (no Dagster): every input row once, with a status."""

from __future__ import annotations

import gc
import json
import os
import socket
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from conftest import BAD_IMAGES, GOOD_IMAGES, write_url_file
from imageserver import ImageServer

from img2ds_dagster.engine import distribute
from img2ds_dagster.engine import sample as sample_module
from img2ds_dagster.engine.cpu import CpuPool
from img2ds_dagster.engine.distribute import build_shards
from img2ds_dagster.engine.settings import DownloadSettings
from img2ds_dagster.engine.shard import ShardJob, ShardResult, Workers, build_shard
from img2ds_dagster.engine.sources import Staging, TableManifest
from img2ds_dagster.errors import ShardError

WORKERS = Workers(thread_count=8)


def stage(tmp_path: Path, urls: list[str], name: str = "t", **flags: object) -> tuple[Staging, TableManifest]:
    path = write_url_file(
        tmp_path / f"{name}.csv",
        urls,
        captions=[f"caption {i}" for i in range(len(urls))],
        extra={"rank": list(range(len(urls)))},
    )
    settings = DownloadSettings.from_flags(
        caption_col="caption", save_additional_columns=["rank"], timeout=2, **flags
    )
    staging = Staging(str(tmp_path / "staging"))
    return staging, staging.stage(name, str(path), settings, str(tmp_path / "out" / name))


def test_the_waits_before_retries_are_in_the_stats(server: ImageServer, tmp_path: Path) -> None:
    urls = [server.url(f"/retry-after/1/1/gen/16x16.jpg?stats={i}") for i in range(2)]
    # Too long: not waited for. (Another host name for the same server: two 429s in a row pause a host.)
    urls.append(f"http://localhost:{server.port}/retry-after/1/600/gen/16x16.jpg?stats=long")
    staging, _ = stage(tmp_path, urls, retries=1)
    result = build_shard(staging, ShardJob("t", 0), WORKERS)
    stats = json.loads((tmp_path / "out" / "t" / "00000_stats.json").read_text())
    assert (stats["successes"], stats["retry_waits"], stats["retry_wait_seconds"]) == (2, 2, 2.0)
    assert result.stats.retry_waits == 2


def test_every_row_appears_once_with_its_status(server: ImageServer, tmp_path: Path) -> None:
    paths = [*GOOD_IMAGES, *BAD_IMAGES, "/slow.jpg"]
    urls = [server.url(p) for p in paths] + ["", "ftp://127.0.0.1/a.jpg"]
    staging, _manifest = stage(tmp_path, urls, output_format="webdataset", number_sample_per_shard=100)
    result = build_shard(staging, ShardJob("t", 0), WORKERS)

    table = pq.read_table(tmp_path / "out" / "t" / "00000.parquet")
    rows = table.to_pylist()
    assert [r["url"] for r in rows] == urls
    assert [r["key"] for r in rows] == [f"00000{i:02d}" for i in range(len(urls))]  # ceil(log10(100)) = 2
    assert [r["rank"] for r in rows] == list(range(len(urls)))
    expected = ["success"] * len(GOOD_IMAGES) + list(BAD_IMAGES.values()) + ["failed_to_download"] * 3
    assert [r["status"] for r in rows] == expected
    by_path = {p: r for p, r in zip(paths, rows, strict=False)}
    assert by_path["/slow.jpg"]["error_message"] == "timed out"
    assert rows[-2]["error_message"] == "empty URL"
    for path, (width, height) in GOOD_IMAGES.items():
        row = by_path[path]
        assert (row["original_width"], row["original_height"], row["width"], row["height"]) == (
            width,
            height,
            256,
            256,
        )
        assert row["error_message"] is None
        assert len(row["sha256"]) == 64
        assert row["exif"] is not None
    assert all(r["width"] is None and r["sha256"] is None for r in rows if r["status"] != "success")

    stats = json.loads((tmp_path / "out" / "t" / "00000_stats.json").read_text())
    assert list(stats) == [
        *("count", "successes", "failed_to_download", "failed_to_resize"),
        *("duration", "start_time", "end_time", "status_dict"),
        *("retry_waits", "retry_wait_seconds", "opt_outs", "worker"),  # ours, after img2dataset's keys
    ]
    assert stats["worker"] == f"{socket.gethostname()} pid {os.getpid()}"  # built in this process
    assert (stats["count"], stats["successes"]) == (len(urls), len(GOOD_IMAGES))
    assert stats["status_dict"]["success"] == len(GOOD_IMAGES)
    assert stats["status_dict"]["HTTP Error 404: Not Found"] == 1
    assert result.stats.to_json()["count"] == len(urls)

    with tarfile.open(tmp_path / "out" / "t" / "00000.tar") as tar:
        assert [n for n in tar.getnames() if n.endswith(".jpg")] == [
            f"00000{i:02d}.jpg" for i in range(len(GOOD_IMAGES))
        ]
        assert tar.extractfile("0000000.txt").read() == b"caption 0"  # type: ignore[union-attr]


def test_keys_follow_img2dataset_digits(server: ImageServer, tmp_path: Path) -> None:
    urls = [server.url("/gen/10x10.jpg")] * 3
    staging, _manifest = stage(tmp_path, urls, number_sample_per_shard=2, oom_shard_count=3)
    build_shard(staging, ShardJob("t", 1), WORKERS)
    keys = pq.read_table(tmp_path / "out" / "t" / "001.parquet").column("key").to_pylist()
    # ceil(log10(2)) = 1 digit of index after 3 digits of shard id, as img2dataset names them.
    assert keys == ["0010"]
    assert sorted(p.name for p in (tmp_path / "out" / "t" / "001").iterdir()) == [
        "0010.jpg",
        "0010.json",
        "0010.txt",
    ]


def test_shards_build_in_parallel_and_a_broken_one_is_reported(server: ImageServer, tmp_path: Path) -> None:
    urls = [server.url(f"/gen/{20 + i}x{30 + i}.jpg") for i in range(8)]
    staging, manifest = stage(tmp_path, urls, number_sample_per_shard=2, output_format="parquet")
    Path(staging.shard_path("t", "00002")).unlink()
    jobs = [ShardJob("t", i) for i in manifest.shard_ids]
    results = dict(build_shards(staging.root, jobs, Workers(thread_count=4, parallel_shards=2)))
    assert set(results) == set(jobs)
    failed = results[ShardJob("t", 2)]
    assert isinstance(failed, ShardError)
    assert "shard t/00002" in str(failed)
    assert "re-materialize url_tables[t]" in str(failed)
    for job in jobs:
        if job.shard_id != 2:
            assert not isinstance(results[job], ShardError)
            assert results[job].stats.successes == 2  # type: ignore[union-attr]
    assert not (tmp_path / "out" / "t" / "00002_stats.json").exists()


def test_rebuilding_gives_byte_identical_shards(server: ImageServer, tmp_path: Path) -> None:
    urls = [server.url(p) for p in (*GOOD_IMAGES, *BAD_IMAGES)]
    staging, _ = stage(tmp_path, urls, output_format="webdataset", number_sample_per_shard=100)
    build_shard(staging, ShardJob("t", 0), WORKERS)
    first = {p.name: p.read_bytes() for p in (tmp_path / "out" / "t").iterdir() if p.suffix != ".json"}
    build_shard(staging, ShardJob("t", 0), Workers(thread_count=3))
    second = {p.name: p.read_bytes() for p in (tmp_path / "out" / "t").iterdir() if p.suffix != ".json"}
    assert first == second


def test_unknown_shard_id_is_a_shard_error(server: ImageServer, tmp_path: Path) -> None:
    staging, _ = stage(tmp_path, [server.url("/gen/10x10.jpg")])
    with pytest.raises(ShardError, match="table 't' has shards range"):
        build_shard(staging, ShardJob("t", 5), WORKERS)


def _queue_behind_a_busy_worker(pool: CpuPool, tasks: list[tuple[str, int]]) -> list[str]:
    """Occupy the pool's only thread, queue ``(name, lane)`` tasks one by one from their own
    threads, then let the pool go: returns the names in the order the pool ran them."""
    busy, release = threading.Event(), threading.Event()
    done: list[str] = []

    def block() -> None:
        busy.set()
        release.wait(30)

    threads = [threading.Thread(target=pool.run, args=(block,))]
    threads[0].start()
    try:
        assert busy.wait(10), "the pool never started the blocking task"
        for queued, (name, lane) in enumerate(tasks, start=1):
            threads.append(threading.Thread(target=pool.run, args=(lambda n=name: done.append(n), lane)))
            threads[-1].start()
            deadline = time.monotonic() + 10
            while pool._queue.qsize() < queued:  # queued in this order, not just started
                assert time.monotonic() < deadline, "a task was never queued"
                time.sleep(0.001)
    finally:
        release.set()
        for thread in threads:
            thread.join(10)
    return done


def test_cpu_pool_serves_the_oldest_lane_first_and_the_newest_work_within_a_lane() -> None:
    with CpuPool(1) as pool:
        first, second = pool.lane(), pool.lane()
        assert first < second
        order = _queue_behind_a_busy_worker(
            pool, [("b1", second), ("a1", first), ("b2", second), ("a2", first), ("a3", first)]
        )
    assert order == ["a3", "a2", "a1", "b2", "b1"]


def test_cpu_pool_hands_a_task_error_to_its_caller_and_keeps_working() -> None:
    def broken() -> None:
        raise ValueError("bad image")

    with CpuPool(2) as pool:
        with pytest.raises(ValueError, match="bad image"):
            pool.run(broken)
        assert pool.run(lambda: 42) == 42


def test_shards_built_together_take_lanes_in_job_order(
    server: ImageServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CPU goes to the shards in the order they were asked for, whatever order they start in."""
    urls = [server.url(p) for p in GOOD_IMAGES] * 3
    staging, _manifest = stage(
        tmp_path, urls, output_format="webdataset", number_sample_per_shard=len(urls) // 3
    )
    lanes: dict[int, int | None] = {}

    def recording(*args: Any, **kwargs: Any) -> ShardResult:
        lanes[args[1].shard_id] = kwargs["turn"].lane
        return build_shard(*args, **kwargs)

    monkeypatch.setattr(distribute, "build_shard", recording)
    jobs = [ShardJob("t", i) for i in (2, 0, 1)]
    results = dict(build_shards(staging.root, jobs, Workers(thread_count=4, parallel_shards=3)))
    assert not [r for r in results.values() if isinstance(r, ShardError)]
    assert lanes == {2: 0, 0: 1, 1: 2}


def _freeze_counts_during_build(
    server: ImageServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> list[int]:
    """Build two shards; returns gc.get_freeze_count() as each shard started."""
    urls = [server.url(p) for p in GOOD_IMAGES] * 2
    staging, _ = stage(tmp_path, urls, output_format="webdataset", number_sample_per_shard=len(urls) // 2)
    counts: list[int] = []

    def recording(*args: Any, **kwargs: Any) -> ShardResult:
        counts.append(gc.get_freeze_count())
        return build_shard(*args, **kwargs)

    monkeypatch.setattr(distribute, "build_shard", recording)
    results = dict(build_shards(staging.root, [ShardJob("t", 0), ShardJob("t", 1)], Workers(thread_count=4)))
    assert not [r for r in results.values() if isinstance(r, ShardError)]
    return counts


def test_objects_from_before_the_build_are_left_out_of_collections_until_it_ends(
    server: ImageServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert gc.get_freeze_count() == 0
    counts = _freeze_counts_during_build(server, tmp_path, monkeypatch)
    assert len(counts) == 2
    assert min(counts) > 1000  # this test process's modules, at least
    assert gc.get_freeze_count() == 0


def test_objects_the_process_froze_itself_stay_frozen(
    server: ImageServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gc.freeze()
    try:
        before = gc.get_freeze_count()
        counts = _freeze_counts_during_build(server, tmp_path, monkeypatch)
        # Frozen objects can still be freed (by reference counting), but none are added or thawed.
        assert all(0.9 * before <= count <= before for count in counts)
        assert 0.9 * before <= gc.get_freeze_count() <= before
    finally:
        gc.unfreeze()


def test_the_heap_is_left_out_of_the_collections_at_exit() -> None:
    # A handler registered before prepare_process() runs after its own (atexit is last in, first
    # out): by then the heap is frozen, and only the interpreter's teardown is left.
    script = (
        "import atexit, gc\n"
        "atexit.register(lambda: print('frozen at exit:', gc.get_freeze_count()))\n"
        "from img2ds_dagster.engine.runtime import prepare_process\n"
        "prepare_process()\n"
        "print('frozen before exit:', gc.get_freeze_count())\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    before, at_exit = (int(line.rsplit(" ", 1)[1]) for line in out.splitlines())
    assert before == 0
    assert at_exit > 10_000  # OpenCV, numpy, fsspec and the engine's modules, at least


def test_an_unexpected_error_fails_the_shard_as_itself(
    server: ImageServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A bug in the image step (not a bad image, which is an outcome) stops the shard's downloads
    # and comes out of build_shard as the error it is, not wrapped in an exception group.
    def broken(self: object, raw: bytes, header: object = None, boxes: object = None) -> None:
        raise RuntimeError("bug in the image step")

    monkeypatch.setattr(sample_module.ImageProcessor, "process", broken)
    staging, _manifest = stage(tmp_path, [server.url(p) for p in [*GOOD_IMAGES] * 5])
    with pytest.raises(RuntimeError, match="bug in the image step"):
        build_shard(staging, ShardJob("t", 0), WORKERS)
