"""Retry only the failed samples: a shard rebuilt with only its transient failures downloaded again
is byte for byte the shard a first build would have written had they succeeded, and nothing else is
requested again. Through the engine, ``download(incremental_mode="retry_failed")`` and the ``shards``
asset's run config."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import dagster as dg
import pyarrow.parquet as pq
import pytest
from conftest import write_url_file
from imageserver import ImageServer

from img2ds_dagster import download
from img2ds_dagster.defs.resources import StorageResource, WorkersResource
from img2ds_dagster.defs.shards import shards
from img2ds_dagster.defs.url_tables import url_tables
from img2ds_dagster.engine.retry import is_transient, transient_failures
from img2ds_dagster.engine.settings import DownloadSettings
from img2ds_dagster.engine.shard import ShardJob, Workers, build_shard
from img2ds_dagster.engine.sources import Staging

FLAGS: dict[str, Any] = {"timeout": 2, "retries": 0, "caption_col": "caption"}
ASSETS = [url_tables, shards]


def urls(server: ImageServer) -> dict[str, str]:
    """A shard's URLs by role; unique to the test (the server counts flaky requests per URL). The
    429 goes to another host name: two slow-downs in a row would pause the host (polite.py)."""
    run = uuid.uuid4().hex[:8]
    return {
        "ok_jpg": server.url(f"/gen/64x48.jpg?run={run}"),
        "failed_503": server.url(f"/flaky/1/gen/80x60.jpg?run={run}"),
        "missing": server.url(f"/status/404?run={run}"),
        "ok_png": server.url(f"/gen/40x30.png?run={run}"),
        "failed_429": f"http://localhost:{server.port}/retry-after/1/0/gen/50x70.jpg?run={run}",
        "not_an_image": server.url(f"/html?run={run}"),
    }


def target(url: str) -> str:
    """The request target the server counts a URL's hits under."""
    return "/" + url.split("/", 3)[3]


def shard_files(folder: Path) -> dict[str, bytes]:
    """Every file of a table's output folder but its stats (whose times differ), by relative path."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.endswith("_stats.json")
    }


def image_hits(server: ImageServer) -> dict[str, int]:
    """The requests for images since the last reset (each host's robots.txt is read once per run)."""
    return {t: n for t, n in server.hits.snapshot().items() if t != "/robots.txt"}


def write_urls(path: Path, roles: dict[str, str]) -> Path:
    return write_url_file(path, list(roles.values()), captions=list(roles))


def test_the_transient_rule() -> None:
    transient = [
        "timed out",
        "HTTP Error 503: Service Unavailable",
        "HTTP Error 429: Too Many Requests (Retry-After 600 s, more than the 3.9 s left)",
        "HTTP Error 500: Internal Server Error",
        "connection refused (tried 127.0.0.1 port 9)",
        "cannot connect: Network is unreachable",
        "bad HTTP response: RemoteDisconnected",
        "connection closed before the whole body arrived",
        "cannot resolve host: Temporary failure in name resolution",
        "example.com: host given up after 5 failures in a row (the last: timed out)",
        "example.com: host asked to slow down: paused 30 s more, past this sample's time",
        "robots.txt answered 503: every path disallowed for this run",
        "timed out (robots.txt unreachable: every path disallowed for this run)",
    ]
    final = [
        "HTTP Error 404: Not Found",
        "HTTP Error 403: Forbidden",
        "empty URL",
        "hash mismatch",
        "cannot resolve host: Name or service not known",
        "robots.txt: disallowed for img2dataset (path /a.jpg)",
        "Use of image disallowed by X-Robots-Tag directive",
        "body of 999999999 bytes is over the 1000-byte limit",
        "SSL error: certificate verify failed",
    ]
    assert [is_transient("failed_to_download", e) for e in transient] == [True] * len(transient)
    assert [is_transient("failed_to_download", e) for e in final] == [False] * len(final)
    assert not is_transient("failed_to_resize", "timed out")  # a decode failure is never retried
    assert not is_transient("success", None)


@pytest.mark.parametrize("output_format", ["webdataset", "files", "parquet", "tfrecord"])
def test_retry_failed_recovers_rows_and_leaves_the_others_bytes_untouched(
    server: ImageServer, tmp_path: Path, output_format: str
) -> None:
    roles = urls(server)
    source = write_urls(tmp_path / "urls.csv", roles)
    settings = DownloadSettings.from_flags(output_format=output_format, **FLAGS)
    staging = Staging(str(tmp_path / "staging"))
    staging.stage("first", str(source), settings, str(tmp_path / "out" / "first"))
    staging.stage("reference", str(source), settings, str(tmp_path / "out" / "reference"))
    workers = Workers(thread_count=8)

    first = build_shard(staging, ShardJob("first", 0), workers)
    assert (first.stats.successes, first.retry) == (2, None)
    assert transient_failures(str(tmp_path / "out" / "first"), "00000") == 2
    # The same rows from a server that no longer fails them: what the retried shard must equal.
    build_shard(staging, ShardJob("reference", 0), workers)

    server.hits.reset()
    retried = build_shard(staging, ShardJob("first", 0), Workers(thread_count=8, retry_failed=True))
    assert retried.retry is not None
    assert (retried.retry.retried, retried.retry.recovered, retried.retry.rebuilt) == (2, 2, None)
    # Only the transient failures were requested again: not the successes, the 404 or the html page.
    assert image_hits(server) == {target(roles["failed_503"]): 1, target(roles["failed_429"]): 1}
    assert shard_files(tmp_path / "out" / "first") == shard_files(tmp_path / "out" / "reference")
    table = pq.read_table(tmp_path / "out" / "first" / "00000.parquet")
    assert table.column("status").to_pylist() == [
        *("success", "success", "failed_to_download", "success", "success", "failed_to_resize")
    ]
    assert table.column("error_message").to_pylist()[2] == "HTTP Error 404: Not Found"
    stats = json.loads((tmp_path / "out" / "first" / "00000_stats.json").read_text())
    assert (stats["count"], stats["successes"], stats["failed_to_download"]) == (6, 4, 1)
    assert stats["status_dict"] == {"success": 4, "HTTP Error 404: Not Found": 1, **_resize_error(table)}

    # Nothing transient left: the shard is left as it is, and nothing is requested.
    server.hits.reset()
    before = shard_files(tmp_path / "out" / "first")
    again = build_shard(staging, ShardJob("first", 0), Workers(thread_count=8, retry_failed=True))
    assert again.retry is not None
    assert (again.retry.retried, again.bytes_written) == (0, 0)
    assert again.stats.successes == 4
    assert image_hits(server) == {}
    assert shard_files(tmp_path / "out" / "first") == before


def _resize_error(table: Any) -> dict[str, int]:
    return {table.column("error_message").to_pylist()[5]: 1}


def test_a_shard_not_complete_or_in_dummy_format_is_built_in_full(
    server: ImageServer, tmp_path: Path
) -> None:
    roles = urls(server)
    source = write_urls(tmp_path / "urls.csv", roles)
    staging = Staging(str(tmp_path / "staging"))
    for table, output_format in (("files", "files"), ("dummy", "dummy")):
        settings = DownloadSettings.from_flags(output_format=output_format, **FLAGS)
        staging.stage(table, str(source), settings, str(tmp_path / "out" / table))
    retrying = Workers(thread_count=8, retry_failed=True)

    never_built = build_shard(staging, ShardJob("files", 0), retrying)
    assert never_built.retry is not None
    assert never_built.retry.rebuilt is not None
    assert "no complete shard" in never_built.retry.rebuilt
    (tmp_path / "out" / "files" / "00000_stats.json").unlink()  # as a build killed before its end
    server.hits.reset()
    incomplete = build_shard(staging, ShardJob("files", 0), retrying)
    assert incomplete.retry is not None
    assert incomplete.retry.rebuilt is not None
    assert len(image_hits(server)) == len(roles)  # every row downloaded again

    build_shard(staging, ShardJob("dummy", 0), Workers(thread_count=8))
    dummy = build_shard(staging, ShardJob("dummy", 0), retrying)
    assert dummy.retry is not None
    assert dummy.retry.rebuilt is not None
    assert "dummy" in dummy.retry.rebuilt


def test_download_retry_failed(server: ImageServer, tmp_path: Path) -> None:
    roles = urls(server)
    source = write_urls(tmp_path / "urls.csv", roles)
    options: dict[str, Any] = {
        "url_list": str(source),
        "input_format": "csv",
        "caption_col": "caption",
        "output_format": "webdataset",
        "number_sample_per_shard": 3,  # shard 0: ok, 503, 404; shard 1: ok, 429, html
        "thread_count": 8,
        "timeout": 2,
        "retries": 0,
    }
    first = download(output_folder=str(tmp_path / "out"), **options)
    assert first.totals["successes"] == 2
    download(output_folder=str(tmp_path / "reference"), **options)

    server.hits.reset()
    report = download(output_folder=str(tmp_path / "out"), incremental_mode="retry_failed", **options)
    assert (report.retried, report.recovered) == (2, 2)
    assert sorted(report.shards_built) == ["urls/00000", "urls/00001"]
    assert report.totals["successes"] == 4
    assert image_hits(server) == {target(roles["failed_503"]): 1, target(roles["failed_429"]): 1}
    assert shard_files(tmp_path / "out" / "urls") == shard_files(tmp_path / "reference" / "urls")

    # Nothing left to retry: every shard skipped, untouched.
    server.hits.reset()
    again = download(output_folder=str(tmp_path / "out"), incremental_mode="retry_failed", **options)
    assert (again.retried, again.recovered, again.shards_built) == (0, 0, [])
    assert sorted(again.shards_skipped) == ["urls/00000", "urls/00001"]
    assert image_hits(server) == {}


def test_the_shards_asset_retries_failed_samples_with_its_run_config(
    server: ImageServer, tmp_path: Path
) -> None:
    roles = urls(server)
    write_urls(tmp_path / "inbox" / "t.csv", roles)
    resources = {
        "storage": StorageResource(
            inbox=str(tmp_path / "inbox"),
            staging=str(tmp_path / "staging"),
            datasets=str(tmp_path / "datasets"),
        ),
        "workers": WorkersResource(thread_count=8),
    }
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("url_tables", ["t"])
        stage_config = {"caption_col": "caption", "output_format": "webdataset", "timeout": 2, "retries": 0}
        dg.materialize(
            ASSETS,
            selection=[url_tables],
            partition_key="t",
            instance=instance,
            resources=resources,
            run_config={"ops": {"url_tables": {"config": stage_config}}},
        )

        def build(run_config: dict[str, Any] | None = None) -> dict[str, Any]:
            result = dg.materialize(
                ASSETS,
                selection=[shards],
                partition_key="t/00000",
                instance=instance,
                resources=resources,
                run_config=run_config or {},
            )
            (event,) = result.asset_materializations_for_node("shards")
            return {k: v.value for k, v in event.metadata.items()}

        first = build()  # no run config: a full build, as before
        assert first["successes"] == 2
        assert "retried" not in first
        server.hits.reset()
        meta = build({"ops": {"shards": {"config": {"retry_failed": True}}}})
        assert (meta["retried"], meta["recovered"], meta["successes"]) == (2, 2, 4)
        assert image_hits(server) == {target(roles["failed_503"]): 1, target(roles["failed_429"]): 1}
