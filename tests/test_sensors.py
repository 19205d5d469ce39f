"""The two sensors: ``url_drop_sensor`` (inbox files -> url_tables partitions and runs) and
``new_shards_sensor`` (staged tables -> ranged shard runs), called directly and through the daemon.

Called directly, a sensor's ``dynamic_partitions_requests`` are returned but not applied; the sensor
daemon applies them, which the end-to-end test relies on.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import BAD_IMAGES, GOOD_IMAGES, write_url_file
from dagster._core.definitions.data_version import DATA_VERSION_TAG
from dagster_support import daemon_workspace, sensor_cursors, statuses, tick_sensors
from imageserver import ImageServer

from img2ds_dagster.defs.inbox import drop_config
from img2ds_dagster.defs.partitions import (
    RANGE_END_TAG,
    RANGE_START_TAG,
    SHARDS,
    URL_TABLES,
    shard_keys,
    shards_per_run,
)
from img2ds_dagster.defs.resources import StorageResource, WorkersResource
from img2ds_dagster.defs.sensors import new_shards_sensor, url_drop_sensor
from img2ds_dagster.defs.shards import INPUT_FINGERPRINT, recorded_fingerprints, shards
from img2ds_dagster.defs.stats import download_stats
from img2ds_dagster.defs.url_tables import url_tables
from img2ds_dagster.errors import ConfigError

SensorOutcome = dg.SensorResult | dg.SkipReason


def storage_in(root: Path, settle: float = 0.0) -> StorageResource:
    """Resources for a test folder. Files count as arrived at their ctime, which tests cannot set back,
    so the settle delay is 0 unless a test is about it."""
    return StorageResource(
        inbox=str(root / "inbox"),
        staging=str(root / "staging"),
        datasets=str(root / "datasets"),
        inbox_settle_seconds=settle,
    )


def age(path: Path, seconds: float) -> None:
    """Make a file look written ``seconds`` ago: the inbox ignores files younger than its settle delay."""
    mtime = time.time() - seconds
    os.utime(path, (mtime, mtime))


def as_outcome(returned: object) -> SensorOutcome:
    # A sensor's declared return type is wide; ours return exactly one of these two.
    assert isinstance(returned, dg.SensorResult | dg.SkipReason), returned
    return returned


def drop_tick(instance: dg.DagsterInstance, storage: StorageResource, cursor: str | None) -> SensorOutcome:
    context = dg.build_sensor_context(instance=instance, cursor=cursor, resources={"storage": storage})
    return as_outcome(url_drop_sensor(context))


def requests_by_key(outcome: SensorOutcome) -> dict[str, dg.RunRequest]:
    assert isinstance(outcome, dg.SensorResult), outcome
    found: dict[str, dg.RunRequest] = {}
    for request in outcome.run_requests or []:
        assert request.partition_key is not None
        found[request.partition_key] = request
    return found


def table_config(request: dg.RunRequest) -> dict[str, Any]:
    return dict(request.run_config["ops"]["url_tables"]["config"])


# --- url_drop_sensor -------------------------------------------------------------------------------


def test_url_drop_sensor_registers_each_settled_file_once(tmp_path: Path) -> None:
    storage = storage_in(tmp_path)
    inbox = tmp_path / "inbox"
    a = write_url_file(inbox / "a.csv", ["http://h/1", "http://h/2"], captions=["one", "two"])
    b = write_url_file(inbox / "b.parquet", ["http://h/3"])
    with dg.instance_for_test() as instance:
        first = drop_tick(instance, storage, None)
        found = requests_by_key(first)
        assert sorted(found) == ["a", "b"]
        assert table_config(found["a"]) == {"source": str(a)}
        assert table_config(found["b"]) == {"source": str(b)}
        assert found["a"].tags["img2ds/table"] == "a"
        assert isinstance(first, dg.SensorResult)
        requested = first.dynamic_partitions_requests or []
        added = [(type(r), r.partitions_def_name, sorted(r.partition_keys)) for r in requested]
        assert added == [(dg.AddDynamicPartitionsRequest, URL_TABLES, ["a", "b"])]

        # Nothing new: each file is registered exactly once across ticks.
        assert isinstance(drop_tick(instance, storage, first.cursor), dg.SkipReason)

        # A file younger than the settle delay may still be being written: it waits.
        write_url_file(inbox / "c.txt", ["http://h/4"])
        assert isinstance(drop_tick(instance, storage_in(tmp_path, settle=3600), first.cursor), dg.SkipReason)
        third = drop_tick(instance, storage, first.cursor)
        assert sorted(requests_by_key(third)) == ["c"]
        assert isinstance(third, dg.SensorResult)

        # Dropped again under the same name: a new run, with a run key of its own.
        write_url_file(inbox / "a.csv", ["http://h/5"])
        fourth = drop_tick(instance, storage, third.cursor)
        again = requests_by_key(fourth)
        assert sorted(again) == ["a"]
        assert again["a"].run_key != found["a"].run_key
        assert isinstance(fourth, dg.SensorResult)
        assert isinstance(drop_tick(instance, storage, fourth.cursor), dg.SkipReason)


def test_files_older_than_a_new_one_dropped_in_the_same_tick_are_not_lost(tmp_path: Path) -> None:
    storage = storage_in(tmp_path)
    inbox = tmp_path / "inbox"
    age(write_url_file(inbox / "a.csv", ["http://h/1"]), 30)
    age(write_url_file(inbox / "b.csv", ["http://h/2"]), 60)  # older, but listed second
    with dg.instance_for_test() as instance:
        first = drop_tick(instance, storage, None)
        seen = set(requests_by_key(first))
        assert isinstance(first, dg.SensorResult)
        later = drop_tick(instance, storage, first.cursor)
        if isinstance(later, dg.SensorResult):
            seen |= set(requests_by_key(later))
        assert seen == {"a", "b"}


def test_a_file_moved_in_with_an_old_mtime_after_a_newer_one_is_not_lost(tmp_path: Path) -> None:
    # The usual way to drop a file atomically: write it elsewhere, then mv it in (mv keeps its mtime).
    storage = storage_in(tmp_path)
    inbox = tmp_path / "inbox"
    prepared = write_url_file(tmp_path / "elsewhere" / "old.csv", ["http://h/1"])
    age(prepared, 3600)
    write_url_file(inbox / "new.csv", ["http://h/2"])
    with dg.instance_for_test() as instance:
        first = drop_tick(instance, storage, None)
        assert sorted(requests_by_key(first)) == ["new"]
        assert isinstance(first, dg.SensorResult)
        prepared.rename(inbox / "old.csv")
        assert sorted(requests_by_key(drop_tick(instance, storage, first.cursor))) == ["old"]


def test_settings_file_next_to_a_url_file(tmp_path: Path) -> None:
    storage = storage_in(tmp_path)
    inbox = tmp_path / "inbox"
    age(write_url_file(inbox / "a.csv", ["http://h/1"], captions=["one"]), 60)
    (inbox / "a.img2ds.toml").write_text('caption_col = "caption"\nnumber_sample_per_shard = 4\n')
    age(write_url_file(inbox / "b.csv", ["http://h/2"]), 60)
    # A value of the wrong type: that file's run fails at once with the reason, instead of the tick.
    (inbox / "b.img2ds.toml").write_text('number_sample_per_shard = "many"\n')
    age(write_url_file(inbox / "c.csv", ["http://h/3"]), 60)
    with dg.instance_for_test() as instance:
        first = drop_tick(instance, storage, None)
        found = requests_by_key(first)
        assert sorted(found) == ["a", "b", "c"]
        assert "b.img2ds.toml: number_sample_per_shard" in table_config(found["b"])["refused"]
        assert "refused" not in table_config(found["c"])
        assert table_config(found["a"]) == {
            "source": str(inbox / "a.csv"),
            "caption_col": "caption",
            "number_sample_per_shard": 4,
        }
        # The bad file is behind the cursor: it comes back only when the URL file is touched.
        assert isinstance(first, dg.SensorResult)
        assert isinstance(drop_tick(instance, storage, first.cursor), dg.SkipReason)
        (inbox / "b.img2ds.toml").write_text("number_sample_per_shard = 4\n")
        age(inbox / "b.csv", 5)
        again = requests_by_key(drop_tick(instance, storage, first.cursor))
        assert sorted(again) == ["b"]
        assert "refused" not in table_config(again["b"])


def test_unknown_option_in_a_settings_file_fails_that_files_run(tmp_path: Path) -> None:
    storage = storage_in(tmp_path)
    inbox = tmp_path / "inbox"
    age(write_url_file(inbox / "a.csv", ["http://h/1"]), 60)
    (inbox / "a.img2ds.toml").write_text("number_samples_per_shard = 4\n")  # note the extra "s"
    age(write_url_file(inbox / "b.csv", ["http://h/2"]), 60)
    with dg.instance_for_test() as instance:
        found = requests_by_key(drop_tick(instance, storage, None))
        assert sorted(found) == ["a", "b"]
        assert "unknown option(s) ['number_samples_per_shard']" in table_config(found["a"])["refused"]


@pytest.mark.parametrize(
    ("inbox_toml", "own_toml", "message"),
    [
        # A value outside its option's list: refused by the config's Literal type.
        ("", 'resize_mode = "stretch"\n', r"a\.img2ds\.toml: resize_mode: must be one of 'no', 'border'"),
        # Only the engine's rule knows this one (png's quality is a compression level); the option
        # comes from the inbox's file, which is the one named.
        ("encode_quality = 95\n", 'encode_format = "png"\n', r"inbox/img2ds\.toml: encode_quality: for png"),
        ("", "number_samples_per_shard = 4\n", r"a\.img2ds\.toml: unknown option\(s\) \['number_samples"),
    ],
)
def test_a_bad_settings_file_is_refused_naming_the_file_and_the_option(
    tmp_path: Path, inbox_toml: str, own_toml: str, message: str
) -> None:
    storage = storage_in(tmp_path)
    inbox = tmp_path / "inbox"
    age(write_url_file(inbox / "a.csv", ["http://h/1"]), 60)
    if inbox_toml:
        (inbox / "img2ds.toml").write_text(inbox_toml)
    (inbox / "a.img2ds.toml").write_text(own_toml)
    with pytest.raises(ConfigError, match=message):
        drop_config(str(inbox / "a.csv"))
    with dg.instance_for_test() as instance:
        outcome = drop_tick(instance, storage, None)
        assert isinstance(outcome, dg.SensorResult)
        # A run that fails at once, naming the file and the option: the table shows as failed.
        (request,) = outcome.run_requests or []
        assert request.partition_key == "a"
        refused = request.run_config["ops"]["url_tables"]["config"]["refused"]
        assert re.search(message, refused)
        assert refused.startswith(f"{inbox / 'a.csv'}: skipped: ")


def test_a_tick_that_only_skips_bad_files_still_advances_the_cursor(tmp_path: Path) -> None:
    storage = storage_in(tmp_path)
    inbox = tmp_path / "inbox"
    age(write_url_file(inbox / "a.csv", ["http://h/1"]), 60)
    (inbox / "a.img2ds.toml").write_text('number_sample_per_shard = "many"\n')
    with dg.instance_for_test() as instance:
        outcome = drop_tick(instance, storage, None)
        assert isinstance(outcome, dg.SensorResult), outcome
        assert [r.partition_key for r in outcome.run_requests or []] == ["a"]  # its failing run
        assert outcome.cursor is not None


def test_a_file_name_without_a_table_key_does_not_block_the_inbox(tmp_path: Path) -> None:
    storage = storage_in(tmp_path)
    inbox = tmp_path / "inbox"
    settled = time.time() - 60
    for name in ("-.csv", "图片.csv", "b.csv"):
        os.utime(write_url_file(inbox / name, ["http://h/1"]), (settled, settled))
    with dg.instance_for_test() as instance:
        # "-" gives no table name and is skipped; letters of any script make a name.
        assert sorted(requests_by_key(drop_tick(instance, storage, None))) == ["b", "图片"]


# --- new_shards_sensor -----------------------------------------------------------------------------


def stage(instance: dg.DagsterInstance, root: Path, table: str, rows: int) -> None:
    """Materialize url_tables[table] for a URL file of ``rows`` rows, 2 rows per shard."""
    source = write_url_file(root / "sources" / f"{table}-{rows}.csv", [f"http://h/{i}" for i in range(rows)])
    instance.add_dynamic_partitions(URL_TABLES, [table])
    config = {"source": str(source), "number_sample_per_shard": 2, "output_format": "webdataset"}
    result = dg.materialize(
        [url_tables, shards, download_stats],
        selection=[url_tables],
        partition_key=table,
        instance=instance,
        resources={"storage": storage_in(root), "workers": WorkersResource()},
        run_config={"ops": {"url_tables": {"config": config}}},
    )
    assert result.success


def shards_tick(instance: dg.DagsterInstance, root: Path, cursor: str | None) -> SensorOutcome:
    context = dg.build_sensor_context(
        instance=instance, cursor=cursor, resources={"storage": storage_in(root)}
    )
    return as_outcome(new_shards_sensor(context))


def requested_ranges(instance: dg.DagsterInstance, outcome: SensorOutcome) -> list[list[str]]:
    """Each run request's key range, expanded over the shard partitions in registration order (the
    order Dagster expands a range in)."""
    assert isinstance(outcome, dg.SensorResult), outcome
    ordered = list(instance.get_dynamic_partitions(SHARDS))
    ranges = []
    for request in outcome.run_requests or []:
        first, last = request.tags[RANGE_START_TAG], request.tags[RANGE_END_TAG]
        ranges.append(ordered[ordered.index(first) : ordered.index(last) + 1])
    return ranges


def test_new_shards_sensor_requests_each_staged_shard_in_ranges(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IMG2DS_SHARDS_PER_RUN", "4")  # read at each tick
    with dg.instance_for_test() as instance:
        assert isinstance(shards_tick(instance, tmp_path, None), dg.SkipReason)
        stage(instance, tmp_path, "t", rows=20)
        keys = [f"t/{i:05d}" for i in range(10)]
        assert instance.get_dynamic_partitions(SHARDS) == keys

        first = shards_tick(instance, tmp_path, None)
        ranges = requested_ranges(instance, first)
        assert [k for r in ranges for k in r] == keys  # every shard once, in order
        assert [len(r) for r in ranges] == [4, 4, 2]
        assert isinstance(first, dg.SensorResult)
        assert {r.tags["img2ds/table"] for r in first.run_requests or []} == {"t"}
        assert isinstance(shards_tick(instance, tmp_path, first.cursor), dg.SkipReason)


def test_new_shards_sensor_ranges_never_cross_into_another_table(tmp_path: Path) -> None:
    with dg.instance_for_test() as instance:
        stage(instance, tmp_path, "t1", rows=4)
        t1 = shards_tick(instance, tmp_path, None)
        assert requested_ranges(instance, t1) == [["t1/00000", "t1/00001"]]
        assert isinstance(t1, dg.SensorResult)
        stage(instance, tmp_path, "t2", rows=4)
        t2 = shards_tick(instance, tmp_path, t1.cursor)
        assert requested_ranges(instance, t2) == [["t2/00000", "t2/00001"]]
        assert isinstance(t2, dg.SensorResult)

        # t1 grows: its new keys are registered after t2's, so t1's shards are no longer adjacent.
        stage(instance, tmp_path, "t1", rows=10)
        assert instance.get_dynamic_partitions(SHARDS) == [
            *("t1/00000", "t1/00001", "t2/00000", "t2/00001"),
            *("t1/00002", "t1/00003", "t1/00004"),
        ]
        ranges = requested_ranges(instance, shards_tick(instance, tmp_path, t2.cursor))
        assert ranges == [["t1/00000", "t1/00001"], ["t1/00002", "t1/00003", "t1/00004"]]


def test_a_table_staged_twice_between_ticks_is_requested_once(tmp_path: Path) -> None:
    with dg.instance_for_test() as instance:
        stage(instance, tmp_path, "t1", rows=4)
        stage(instance, tmp_path, "t2", rows=4)
        stage(instance, tmp_path, "t1", rows=10)
        ranges = requested_ranges(instance, shards_tick(instance, tmp_path, None))
        assert all(len({key.split("/")[0] for key in r}) == 1 for r in ranges)  # holds today
        requested = [key for r in ranges for key in r]
        assert sorted(requested) == sorted(set(requested))


def built(instance: dg.DagsterInstance, root: Path, table: str, recorded: str) -> None:
    """Record every shard of the table as built from its rows staged now: with its fingerprint as
    data version, as a shard run records it, or only in its metadata, as shards built before did."""
    manifest = storage_in(root).staging_area().manifest(table)
    for key, shard_id in zip(shard_keys(manifest), manifest.shard_ids, strict=True):
        fingerprint = manifest.fingerprint(shard_id)
        assert fingerprint is not None
        tags = {DATA_VERSION_TAG: fingerprint} if recorded == "data version" else None
        instance.report_runless_asset_event(
            dg.AssetMaterialization(
                asset_key=shards.key, partition=key, metadata={INPUT_FINGERPRINT: fingerprint}, tags=tags
            )
        )


@pytest.mark.parametrize("recorded", ["data version", "metadata only", "both"])
def test_a_table_staged_again_rebuilds_only_the_shards_whose_rows_changed(
    tmp_path: Path, recorded: str
) -> None:
    first_way, second_way = ("data version", "metadata only") if recorded == "both" else (recorded, recorded)
    with dg.instance_for_test() as instance:
        stage(instance, tmp_path, "t", rows=5)  # t/00002 holds one row
        first = shards_tick(instance, tmp_path, None)
        assert isinstance(first, dg.SensorResult)
        built(instance, tmp_path, "t", first_way)
        stage(instance, tmp_path, "t", rows=7)  # two rows appended: t/00002 grows, t/00003 is new
        second = shards_tick(instance, tmp_path, first.cursor)
        assert requested_ranges(instance, second) == [["t/00002", "t/00003"]]
        assert isinstance(second, dg.SensorResult)
        built(instance, tmp_path, "t", second_way)
        manifest = storage_in(tmp_path).staging_area().manifest("t")
        keys = shard_keys(manifest)
        staged = [manifest.fingerprint(i) for i in manifest.shard_ids]
        # One record per page and one shard per query where the metadata is read.
        assert recorded_fingerprints(instance, keys, batch=1, page=1) == dict(zip(keys, staged, strict=True))
        stage(instance, tmp_path, "t", rows=7)  # the same file again: nothing to rebuild
        third = shards_tick(instance, tmp_path, second.cursor)
        assert isinstance(third, dg.SensorResult)
        assert third.run_requests == []
        assert third.cursor != second.cursor  # that staging is seen, once


# --- both sensors through the sensor daemon --------------------------------------------------------

# Good images and failures, each once (the query makes repeated routes distinct URLs).
E2E_ROUTES = [
    *GOOD_IMAGES,
    "/gen/640x480.jpg?i=2",
    "/status/404",
    "/html",
    "/truncated.jpg",
    "/robots/noai.jpg",
    "/bomb.jpg",
]
E2E_STATUS = {
    **{route: "success" for route in GOOD_IMAGES},
    "/gen/640x480.jpg?i=2": "success",
    **BAD_IMAGES,
}
BAD_STATUSES = ("failed_to_download", "failed_to_resize")


def run_ids(instance: dg.DagsterInstance) -> set[str]:
    return {record.dagster_run.run_id for record in instance.get_run_records()}


@pytest.mark.slow
def test_a_dropped_file_becomes_a_dataset_through_the_sensor_daemon(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, server: ImageServer
) -> None:
    # The code location's paths are relative: the code server and the inline runs resolve them here.
    monkeypatch.chdir(tmp_path)
    inbox = tmp_path / "data" / "inbox"
    urls = [server.url(route) for route in E2E_ROUTES]
    assert len(urls) == 12
    drop = write_url_file(inbox / "drop.csv", urls, captions=[f"caption {i}" for i in range(len(urls))])
    (inbox / "drop.img2ds.toml").write_text(
        'number_sample_per_shard = 4\noutput_format = "webdataset"\ncaption_col = "caption"\n'
    )
    dropped = time.time()
    keys = ["drop/00000", "drop/00001", "drop/00002"]

    with (
        dg.instance_for_test(synchronous_run_launcher=True, synchronous_run_coordinator=True) as instance,
        daemon_workspace(instance) as ctx,
    ):
        # The code location leaves a file alone for 2 s after it arrives (its ctime, which a test
        # cannot set back), in case it is still being copied in.
        time.sleep(max(0.0, dropped + 2.1 - time.time()))
        # Each tick may launch the next step (stage, shards, stats), depending on the order the
        # daemon evaluates the sensors in; it is done when a tick launches nothing.
        for _ in range(6):
            before = run_ids(instance)
            tick_sensors(ctx)
            if run_ids(instance) == before:
                break
        else:
            pytest.fail("the sensors still launch runs after 6 ticks")
        assert statuses(instance, ["drop"], url_tables) == {"drop": dg.AssetPartitionStatus.MATERIALIZED}
        assert instance.get_dynamic_partitions(SHARDS) == keys
        assert statuses(instance, keys) == dict.fromkeys(keys, dg.AssetPartitionStatus.MATERIALIZED)
        runs = [record.dagster_run for record in instance.get_run_records()]
        assert all(run.status == dg.DagsterRunStatus.SUCCESS for run in runs)
        # One run per sensor: the 3 shards fit in one run (IMG2DS_SHARDS_PER_RUN), and the stats are
        # refreshed once, after them.
        assert sorted(run.tags.get("dagster/sensor_name", "") for run in runs) == [
            "download_stats_sensor",
            "new_shards_sensor",
            "url_drop_sensor",
        ]

        # The cursors are in the instance: more ticks launch nothing.
        cursors = sensor_cursors(instance)
        assert str(drop) in (cursors["url_drop_sensor"] or "")
        assert cursors["new_shards_sensor"] is not None
        before = run_ids(instance)
        tick_sensors(ctx)
        assert run_ids(instance) == before

    stats = json.loads((tmp_path / "data" / "datasets" / "download_stats.json").read_text())
    statuses_in = Counter(E2E_STATUS.values())
    totals = {k: stats["totals"][k] for k in ("shards", "count", "successes", *BAD_STATUSES)}
    assert totals == {
        "shards": len(keys),
        "count": len(urls),
        "successes": statuses_in["success"],
        **{status: statuses_in[status] for status in BAD_STATUSES},
    }
    dataset = tmp_path / "data" / "datasets" / "drop"
    for name in ("00000", "00001", "00002"):
        for suffix in (".tar", ".parquet", "_stats.json"):
            assert (dataset / f"{name}{suffix}").stat().st_size > 0, f"{name}{suffix}"
    rows = pa.concat_tables(
        [pq.read_table(dataset / f"{name}.parquet") for name in ("00000", "00001", "00002")]
    )
    by_url = {row["url"]: row for row in rows.select(["url", "status", "caption"]).to_pylist()}
    assert sorted(rows.column("url").to_pylist()) == sorted(urls)  # every row exactly once
    assert {route: by_url[server.url(route)]["status"] for route in E2E_ROUTES} == E2E_STATUS
    assert by_url[urls[0]]["caption"] == "caption 0"
    # The tars hold an image, with its json and caption, for each success and nothing else.
    members: Counter[str] = Counter()
    for name in ("00000", "00001", "00002"):
        with tarfile.open(dataset / f"{name}.tar") as tar:
            members.update(member.name.rsplit(".", 1)[1] for member in tar.getmembers())
    assert members == dict.fromkeys(("jpg", "json", "txt"), statuses_in["success"])


@pytest.mark.parametrize("value", ["0", "-3", "many", "2.5"])
def test_a_bad_shards_per_run_is_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("IMG2DS_SHARDS_PER_RUN", value)
    with pytest.raises(ConfigError, match=f"IMG2DS_SHARDS_PER_RUN='{re.escape(value)}': expected a whole"):
        shards_per_run()
