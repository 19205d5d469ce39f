"""S3 in and out, against a real S3-compatible server (moto in server mode on 127.0.0.1): the S3 inbox
sensor and its cursor, the assets with staging and datasets in S3, and ``download()`` from and to S3
(and to ``memory://``). Clients find the server through the standard AWS variables, as they would
find AWS or MinIO.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import dagster as dg
import fsspec
import pyarrow.parquet as pq
import pytest
from conftest import write_url_file
from dagster_support import daemon_workspace, sensor_cursors, tick_sensors
from imageserver import ImageServer
from s3server import S3Server
from test_writers import SCHEMA, fail_half_way, samples, with_successes

from img2ds_dagster import download
from img2ds_dagster.defs.inbox import S3DropCursor, S3Object, split_s3_url
from img2ds_dagster.defs.partitions import RANGE_END_TAG, RANGE_START_TAG, SHARDS, URL_TABLES
from img2ds_dagster.defs.resources import S3InboxResource, StorageResource, WorkersResource, s3_resource
from img2ds_dagster.defs.sensors import s3_url_drop_sensor, url_drop_sensor
from img2ds_dagster.defs.shards import shards
from img2ds_dagster.defs.stats import download_stats
from img2ds_dagster.defs.url_tables import url_tables
from img2ds_dagster.engine import storage as storage_module
from img2ds_dagster.engine.storage import StoreFolder
from img2ds_dagster.engine.writers import ShardTarget, open_writer

ROOT = Path(__file__).resolve().parent.parent
# Four images that download and two URLs that fail, one of each kind.
ROUTES = {
    "/gen/640x480.jpg": "success",
    "/gen/50x50.webp": "success",
    "/gen/100x300.png?alpha=1": "success",
    "/samples/chelsea_451x300_exif.jpg": "success",
    "/status/404": "failed_to_download",
    "/html": "failed_to_resize",
}
# Runs requested by a sensor wait in the queue (no daemon takes them): the test runs them itself.
QUEUED = {"run_coordinator": {"module": "dagster._core.run_coordinator", "class": "QueuedRunCoordinator"}}


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    """The server, and the AWS variables pointing every client of this process (and of the code
    servers it starts) at it."""
    s3fs_class = fsspec.get_filesystem_class("s3")
    with S3Server() as server, pytest.MonkeyPatch.context() as env:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
            env.delenv(name, raising=False)
        for name, value in server.environ().items():
            env.setenv(name, value)
        s3fs_class.clear_instance_cache()  # an s3fs made before would keep its old endpoint
        yield server
        s3fs_class.clear_instance_cache()


@pytest.fixture(scope="module")
def client(s3: S3Server) -> Any:
    """A boto3 S3 client, made by the code location's own resource."""
    return s3_resource().process_config_and_initialize().get_client()


def put_url_file(client: Any, url: str, urls: Sequence[str], tmp_path: Path, **columns: Any) -> str:
    """Upload a URL file (written in the format its name says) to an s3:// URL; returns the URL."""
    bucket, key = url.removeprefix("s3://").split("/", 1)
    local = write_url_file(tmp_path / "upload" / key.rsplit("/", 1)[-1], urls, **columns)
    client.put_object(Bucket=bucket, Key=key, Body=local.read_bytes())
    return url


def s3_tick(
    instance: dg.DagsterInstance, cursor: str | None, inbox: str, staging: Path, every: int = 30
) -> dg.SensorResult:
    resources = {
        "storage": StorageResource(staging=str(staging)),
        "s3": s3_resource(),
        "s3_inbox": S3InboxResource(url=inbox, full_listing_every=every),
    }
    result = s3_url_drop_sensor(
        dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources)
    )
    assert isinstance(result, dg.SensorResult), result  # the cursor is saved on every tick
    return result


def requested(result: dg.SensorResult) -> list[str]:
    return sorted(request.partition_key or "" for request in result.run_requests or [])


# --- the cursor, on its own ------------------------------------------------------------------------


def test_s3_cursor_remembers_recent_files_and_lists_in_full_every_few_ticks() -> None:
    inbox = "s3://bkt/drops/"
    cursor = S3DropCursor.parse(None, inbox)
    assert cursor.full_listing_due(3)  # the first tick lists everything
    b = S3Object("drops/b.csv", 1000.0)
    assert cursor.is_new(b, window=60)
    cursor.advance(b)
    cursor.listed("drops/b.csv", full=True, window=60)
    due = []
    for _ in range(6):
        due.append(cursor.full_listing_due(3))
        cursor.listed("", full=due[-1], window=60)
    assert due == [False, False, True, False, False, True]

    assert not cursor.is_new(b, window=60)  # the same upload
    assert cursor.is_new(S3Object("drops/b.csv", 1001.0), window=60)  # uploaded again
    # Sorts before the cursor, and its LastModified is older than b's: a multipart upload that
    # started before b arrived and finished after. Within the window it is new; far older, it is
    # taken for a file seen long ago.
    assert cursor.is_new(S3Object("drops/a.csv", 950.0), window=60)
    assert not cursor.is_new(S3Object("drops/a.csv", 900.0), window=60)
    assert cursor.is_new(S3Object("drops/c.csv", 1.0), window=60)  # never listed: new, however old

    assert S3DropCursor.parse(cursor.dump(), inbox) == cursor  # what the instance stores
    # Only the files within the window of the newest one are remembered: the cursor stays small.
    cursor.advance(S3Object("drops/d.csv", 5000.0))
    cursor.listed("drops/d.csv", full=False, window=60)
    assert (cursor.after, cursor.mtime, cursor.recent) == ("drops/d.csv", 5000.0, {"drops/d.csv": 5000.0})
    assert S3DropCursor.parse(cursor.dump(), "s3://other/") == S3DropCursor(inbox="s3://other/")
    assert split_s3_url("s3://bkt") == ("bkt", "")
    assert split_s3_url("s3://bkt/a/b") == ("bkt", "a/b/")


# --- the sensor against the server -----------------------------------------------------------------


def test_listing_starts_after_the_cursor_and_a_full_listing_finds_earlier_keys(
    s3: S3Server, client: Any, tmp_path: Path
) -> None:
    client.create_bucket(Bucket="listing")
    inbox = "s3://listing/drops/"
    put_url_file(client, "s3://listing/drops/m.csv", ["http://h/1"], tmp_path)
    client.put_object(Bucket="listing", Key="drops/README.md", Body=b"not a URL file")
    put_url_file(client, "s3://listing/drops/old/x.csv", ["http://h/2"], tmp_path)  # a "subfolder"
    listed = 0

    def tick(cursor: str | None) -> tuple[dg.SensorResult, list[str | None]]:
        # Returns the StartAfter of each ListObjectsV2 request of the inbox prefix this tick made.
        nonlocal listed
        result = s3_tick(instance, cursor, inbox, tmp_path / "staging", every=3)
        requests = s3.listings("listing", "drops/")[listed:]
        listed += len(requests)
        return result, [r.query.get("start-after") for r in requests]

    with dg.instance_for_test() as instance:
        first, lists = tick(None)
        assert (requested(first), lists) == (["m"], [None])  # the first tick lists the prefix
        assert first.dynamic_partitions_requests == [dg.AddDynamicPartitionsRequest(URL_TABLES, ["m"])]

        put_url_file(client, "s3://listing/drops/z.csv", ["http://h/3"], tmp_path)
        put_url_file(client, "s3://listing/drops/a.csv", ["http://h/4"], tmp_path)  # sorts before m
        second, lists = tick(first.cursor)
        assert (requested(second), lists) == (["z"], ["drops/m.csv"])
        third, lists = tick(second.cursor)
        assert (requested(third), lists) == ([], ["drops/z.csv"])
        assert third.skip_reason is not None
        assert "no new URL file" in (third.skip_reason.skip_message or "")
        # Every third tick lists the whole prefix: a.csv, sorting before the cursor, is found there,
        # and the files picked up before are not picked up again.
        fourth, lists = tick(third.cursor)
        assert (requested(fourth), lists) == (["a"], [None])
        fifth, lists = tick(fourth.cursor)
        assert (requested(fifth), lists) == ([], ["drops/z.csv"])


def test_folder_sensor_on_an_s3_inbox_sees_files_dropped_after_a_listing(
    s3: S3Server, client: Any, tmp_path: Path
) -> None:
    # s3fs would answer the second listing from its cache and miss b.csv; engine/runtime.py turns
    # that cache off.
    client.create_bucket(Bucket="folder")
    storage = StorageResource(
        inbox="s3://folder/inbox", staging=str(tmp_path / "staging"), inbox_settle_seconds=0
    )

    def tick(cursor: str | None) -> dg.SensorResult | dg.SkipReason:
        context = dg.build_sensor_context(instance=instance, cursor=cursor, resources={"storage": storage})
        result = url_drop_sensor(context)
        assert isinstance(result, dg.SensorResult | dg.SkipReason)
        return result

    with dg.instance_for_test() as instance:
        put_url_file(client, "s3://folder/inbox/a.csv", ["http://h/1"], tmp_path)
        first = tick(None)
        assert isinstance(first, dg.SensorResult)
        assert requested(first) == ["a"]
        assert first.run_requests
        assert first.run_requests[0].run_config["ops"]["url_tables"]["config"] == {
            "source": "s3://folder/inbox/a.csv"
        }
        put_url_file(client, "s3://folder/inbox/b.csv", ["http://h/2"], tmp_path)
        second = tick(first.cursor)
        assert isinstance(second, dg.SensorResult)
        assert requested(second) == ["b"]


def sensor_runs(instance: dg.DagsterInstance) -> list[dg.DagsterRun]:
    runs = [record.dagster_run for record in instance.get_run_records()]
    return sorted(
        (run for run in runs if run.tags.get("dagster/sensor_name") == "s3_url_drop_sensor"),
        key=lambda run: run.tags["dagster/partition"],
    )


@pytest.mark.slow
def test_a_file_dropped_in_an_s3_inbox_becomes_a_dataset_in_another_bucket(
    s3: S3Server,
    client: Any,
    server: ImageServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client.create_bucket(Bucket="inbox")
    client.create_bucket(Bucket="out")
    urls = [server.url(route) for route in ROUTES]
    captions = [f"caption {i}" for i in range(len(urls))]
    put_url_file(client, "s3://inbox/drops/drop.csv", urls, tmp_path, captions=captions)
    settings = b'number_sample_per_shard = 4\noutput_format = "webdataset"\ncaption_col = "caption"\n'
    client.put_object(Bucket="inbox", Key="drops/drop.img2ds.toml", Body=settings)
    # The code location (a code server started in this folder) reads these when it loads.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("IMG2DS_S3_INBOX", "s3://inbox/drops/")
    monkeypatch.setenv("IMG2DS_STAGING", "s3://out/staging")
    monkeypatch.setenv("IMG2DS_DATASETS", "s3://out/datasets")

    with dg.instance_for_test(overrides=QUEUED) as instance:
        with daemon_workspace(instance) as ctx:
            tick_sensors(ctx)
            tick_sensors(ctx)
            assert instance.get_dynamic_partitions(URL_TABLES) == ["drop"]
            [run] = sensor_runs(instance)
            assert run.tags["dagster/partition"] == "drop"
            config = run.run_config["ops"]["url_tables"]["config"]  # type: ignore[index]
            assert config == {
                "source": "s3://inbox/drops/drop.csv",
                "number_sample_per_shard": 4,
                "output_format": "webdataset",
                "caption_col": "caption",
            }
        # A restart: a new code server, the cursor read back from the instance.
        assert "drops/drop.csv" in (sensor_cursors(instance)["s3_url_drop_sensor"] or "")
        with daemon_workspace(instance) as ctx:
            tick_sensors(ctx)
            assert [r.tags["dagster/partition"] for r in sensor_runs(instance)] == ["drop"]
            put_url_file(client, "s3://inbox/drops/more.txt", urls[:1], tmp_path)
            tick_sensors(ctx)
            assert [r.tags["dagster/partition"] for r in sensor_runs(instance)] == ["drop", "more"]
            assert instance.get_dynamic_partitions(URL_TABLES) == ["drop", "more"]

        # The requested run, then its shards and the stats, with the code location's storage (the
        # folder inbox is empty).
        resources = {
            "storage": StorageResource(
                inbox="data/inbox", staging="s3://out/staging", datasets="s3://out/datasets"
            ),
            "workers": WorkersResource(thread_count=8),
        }
        assets = [url_tables, shards, download_stats]
        staged = dg.materialize(
            assets,
            selection=[url_tables],
            partition_key="drop",
            instance=instance,
            resources=resources,
            run_config=run.run_config,
        )
        assert staged.success
        keys = instance.get_dynamic_partitions(SHARDS)
        assert keys == ["drop/00000", "drop/00001"]
        built = dg.materialize(
            assets,
            selection=[shards],
            instance=instance,
            resources=resources,
            tags={RANGE_START_TAG: keys[0], RANGE_END_TAG: keys[-1]},
        )
        assert built.success
        assert dg.materialize(
            assets, selection=[download_stats], instance=instance, resources=resources
        ).success
        # Staged again from the UI, with no run config: the file is read again from where it was
        # staged from, the S3 inbox.
        again = dg.materialize(
            assets, selection=[url_tables], partition_key="drop", instance=instance, resources=resources
        )
        (event,) = again.asset_materializations_for_node("url_tables")
        assert event.metadata["source"].value == "s3://inbox/drops/drop.csv"

    # Everything is in the output bucket, read back through S3.
    fs = fsspec.filesystem("s3")
    assert fs.exists("out/staging/drop/table.json")
    names = sorted(path.rsplit("/", 1)[-1] for path in fs.ls("out/datasets/drop"))
    assert names == [f"0000{i}{suffix}" for i in (0, 1) for suffix in (".parquet", ".tar", "_stats.json")]
    rows = [
        row
        for i in (0, 1)
        for row in pq.read_table(fs.open(f"out/datasets/drop/0000{i}.parquet")).to_pylist()
    ]
    assert {row["url"]: row["status"] for row in rows} == {server.url(r): s for r, s in ROUTES.items()}
    assert {row["url"]: row["caption"] for row in rows} == dict(zip(urls, captions, strict=True))
    members: Counter[str] = Counter()
    for i in (0, 1):
        with tarfile.open(fileobj=io.BytesIO(fs.cat(f"out/datasets/drop/0000{i}.tar"))) as tar:
            members.update(member.name.rsplit(".", 1)[1] for member in tar.getmembers())
    successes = Counter(ROUTES.values())["success"]
    assert members == dict.fromkeys(("jpg", "json", "txt"), successes)
    totals = json.loads(fs.cat("out/datasets/download_stats.json"))["totals"]
    assert (totals["count"], totals["successes"]) == (len(urls), successes)


def test_a_failed_shard_rewrite_leaves_the_bucket_as_it_was(s3: S3Server, client: Any) -> None:
    client.create_bucket(Bucket="rewrite")
    shard = ShardTarget("s3://rewrite/dataset", "00000", SCHEMA, "jpg", True)
    with open_writer("webdataset", shard) as writer:
        for sample in samples():
            writer.write(sample)
        writer.commit()
    fs = fsspec.filesystem("s3")
    before = {path: fs.cat_file(path) for path in fs.find("rewrite/dataset")}
    assert sorted(before) == ["rewrite/dataset/00000.parquet", "rewrite/dataset/00000.tar"]

    with pytest.raises(RuntimeError, match="half way"):
        fail_half_way("webdataset", shard)
    assert {path: fs.cat_file(path) for path in fs.find("rewrite/dataset")} == before
    assert client.list_multipart_uploads(Bucket="rewrite").get("Uploads", []) == []


def write_and_commit(output_format: str, shard: ShardTarget, written: Sequence[Any]) -> None:
    with open_writer(output_format, shard) as writer:
        for sample in written:
            writer.write(sample)
        writer.commit()


def test_a_shard_that_fails_in_its_commit_uploads_nothing(s3: S3Server, client: Any) -> None:
    # The metadata cannot be written (a width that is not a number): the tar, complete by then, must
    # not reach the bucket, where it would stand beside no parquet or an old one.
    client.create_bucket(Bucket="commit")
    shard = ShardTarget("s3://commit/dataset", "00000", SCHEMA, "jpg", True)
    bad = samples()
    bad[-1].meta["width"] = "wide"
    with pytest.raises((TypeError, ValueError)):
        write_and_commit("webdataset", shard, bad)
    assert fsspec.filesystem("s3").find("commit/dataset") == []


def test_an_upload_that_fails_half_way_is_discarded_not_completed(
    s3: S3Server, client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A multipart upload under way when the connection fails is aborted: closing the file instead
    would complete it with the parts sent so far."""
    client.create_bucket(Bucket="partial")
    monkeypatch.setitem(fsspec.config.conf.setdefault("s3", {}), "default_block_size", 5 << 20)
    fsspec.get_filesystem_class("s3").clear_instance_cache()
    real_copy = storage_module.shutil.copyfileobj

    def network_fails_after_12_mib(source: Any, destination: Any, length: int = 0) -> None:
        real_copy(io.BytesIO(source.read(12 << 20)), destination, 1 << 20)
        raise ConnectionResetError("connection reset by the store")

    monkeypatch.setattr(storage_module.shutil, "copyfileobj", network_fails_after_12_mib)
    try:
        big = storage_module.atomic_file("s3://partial/dataset/00000.tar")
        big.file.write(os.urandom(16 << 20))
        with pytest.raises(ConnectionResetError):
            big.commit()
    finally:
        fsspec.get_filesystem_class("s3").clear_instance_cache()
    assert fsspec.filesystem("s3").find("partial") == []
    assert client.list_multipart_uploads(Bucket="partial").get("Uploads", []) == []


def test_a_files_shard_rewritten_on_s3_has_the_new_versions_objects_only_once_committed(
    s3: S3Server, client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(StoreFolder, "BATCH_OBJECTS", 2)  # uploads under way when the shard fails
    client.create_bucket(Bucket="files")
    shard = ShardTarget("s3://files/dataset", "00000", SCHEMA, "jpg", True)
    with open_writer("files", shard) as writer:
        for sample in samples():  # 0, 1 and 3 succeed
            writer.write(sample)
        writer.commit()
    fs = fsspec.filesystem("s3")
    # A neighbour whose name starts with the folder's: only the folder's own objects are its.
    fs.pipe_file("files/dataset/00000_notes.txt", b"not the shard's")
    before = {path: fs.cat_file(path) for path in fs.find("files/dataset")}
    assert len(before) == 2 + 3 * 3

    with pytest.raises(RuntimeError, match="half way"):
        fail_half_way("files", shard, written=with_successes({0, 1, 2, 3}))
    after = {path: fs.cat_file(path) for path in fs.find("files/dataset")}
    assert sorted(after) == sorted(before)
    assert after["files/dataset/00000.parquet"] == before["files/dataset/00000.parquet"]

    with open_writer("files", shard) as writer:
        for sample in with_successes({2}):
            writer.write(sample)
        writer.commit()
    assert sorted(fs.find("files/dataset")) == [
        "files/dataset/00000.parquet",
        *(f"files/dataset/00000/00002.{ext}" for ext in ("jpg", "json", "txt")),
        "files/dataset/00000_notes.txt",
    ]
    assert fs.cat_file("files/dataset/00000/00002.jpg") == b"new jpeg bytes 00002"


# --- download() ------------------------------------------------------------------------------------


def test_download_from_s3_to_s3(
    s3: S3Server, client: Any, server: ImageServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))  # download() keeps an S3 output's Dagster state in ~/.cache
    client.create_bucket(Bucket="api")
    urls = [server.url(route) for route in ROUTES]
    put_url_file(client, "s3://api/lists/urls.txt", urls, tmp_path)
    arguments: dict[str, Any] = {
        "url_list": "s3://api/lists/urls.txt",
        "output_folder": "s3://api/dataset",
        "output_format": "webdataset",
        "number_sample_per_shard": 4,
        "thread_count": 8,
    }
    report = download(**arguments)
    fs = fsspec.filesystem("s3")
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls("api/dataset")) == [
        f"0000{i}{suffix}" for i in (0, 1) for suffix in (".parquet", ".tar", "_stats.json")
    ]
    rows = [row for i in (0, 1) for row in pq.read_table(fs.open(f"api/dataset/0000{i}.parquet")).to_pylist()]
    assert {row["url"]: row["status"] for row in rows} == {server.url(r): s for r, s in ROUTES.items()}
    assert report.totals["successes"] == Counter(ROUTES.values())["success"]
    assert list((tmp_path / ".cache" / "img2ds_dagster").glob("*/dagster/dagster.yaml"))
    # The state knows what is in the bucket: a second call builds nothing.
    assert sorted(download(**arguments).shards_skipped) == ["urls/00000", "urls/00001"]


def test_download_to_memory(server: ImageServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    url_list = write_url_file(tmp_path / "urls.txt", [server.url("/gen/640x480.jpg"), server.url("/html")])
    fs = fsspec.filesystem("memory")
    try:
        download(url_list=str(url_list), output_folder="memory://img2ds-test/out", output_format="webdataset")
        with tarfile.open(fileobj=io.BytesIO(fs.cat("/img2ds-test/out/00000.tar"))) as tar:
            assert sorted(m.name.rsplit(".", 1)[1] for m in tar.getmembers()) == ["jpg", "json"]
        statuses = pq.read_table(fs.open("/img2ds-test/out/00000.parquet")).column("status").to_pylist()
        assert sorted(statuses) == ["failed_to_resize", "success"]
    finally:
        fs.rm("/img2ds-test", recursive=True)


# --- the code location -----------------------------------------------------------------------------


def test_code_location_with_an_s3_inbox_has_the_sensor_and_no_secret_in_its_config(s3: S3Server) -> None:
    # In a fresh process: the code location reads its variables when it is imported.
    script = (
        "import dagster as dg\n"
        "from img2ds_dagster.definitions import defs\n"
        "dg.Definitions.validate_loadable(defs)\n"
        "print(sorted(s.name for s in defs.sensors))\n"
        "print(repr(defs.resources['s3']))\n"
    )
    env = {**s3.environ(), "IMG2DS_S3_INBOX": "s3://inbox/drops/", "AWS_SECRET_ACCESS_KEY": "hush-hush"}
    result = subprocess.run(
        [sys.executable, "-c", script],
        check=False,
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    sensors, resource = result.stdout.splitlines()[-2:]
    assert "s3_url_drop_sensor" in sensors
    assert "AWS_SECRET_ACCESS_KEY" in resource
    assert "hush-hush" not in result.stdout + result.stderr
