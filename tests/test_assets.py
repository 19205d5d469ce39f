"""The assets through a real Dagster instance: url_tables stages and registers, shards build and
report, download_stats aggregates the files, and the code location loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import fsspec
import pytest
from conftest import BAD_IMAGES, GOOD_IMAGES, write_url_file
from imageserver import ImageServer

from img2ds_dagster.definitions import defs
from img2ds_dagster.defs.export import bucketed_dataset
from img2ds_dagster.defs.resources import StorageResource, WorkersResource
from img2ds_dagster.defs.shards import shards
from img2ds_dagster.defs.stats import download_stats, download_stats_sensor
from img2ds_dagster.defs.url_tables import url_tables

ROOT = Path(__file__).parents[1]
ASSETS = [url_tables, shards, download_stats]
RANGE = ("dagster/asset_partition_range_start", "dagster/asset_partition_range_end")


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.instance_for_test() as inst:
        yield inst


@pytest.fixture
def resources(tmp_path: Path) -> dict[str, Any]:
    return {
        "storage": StorageResource(
            inbox=str(tmp_path / "inbox"),
            staging=str(tmp_path / "staging"),
            datasets=str(tmp_path / "datasets"),
        ),
        "workers": WorkersResource(thread_count=8),
    }


def stage(
    instance: dg.DagsterInstance, resources: dict[str, Any], table: str, **config: Any
) -> dg.ExecuteInProcessResult:
    instance.add_dynamic_partitions("url_tables", [table])
    return dg.materialize(
        ASSETS,
        selection=[url_tables],
        partition_key=table,
        instance=instance,
        resources=resources,
        run_config={"ops": {"url_tables": {"config": config}}},
    )


def test_url_tables_stages_the_file_and_registers_shards(
    tmp_path: Path, instance: dg.DagsterInstance, resources: dict[str, Any]
) -> None:
    write_url_file(
        tmp_path / "inbox" / "laion_part1.csv", [f"http://h/{i}.jpg" for i in range(5)], captions=["c"] * 5
    )
    result = stage(instance, resources, "laion_part1", caption_col="caption", number_sample_per_shard=2)
    assert instance.get_dynamic_partitions("shards") == [f"laion_part1/0000{i}" for i in range(3)]
    (event,) = result.asset_materializations_for_node("url_tables")
    meta = {k: v.value for k, v in event.metadata.items()}
    assert (meta["row_count"], meta["shard_count"], meta["columns"]) == (5, 3, "caption, url")
    assert meta["settings"]["caption_col"] == "caption"  # type: ignore[index]
    assert meta["output_folder"] == str(tmp_path / "datasets" / "laion_part1")
    staged = json.loads((tmp_path / "staging" / "laion_part1" / "table.json").read_text())
    assert staged["settings"]["source"]["number_sample_per_shard"] == 2


def test_a_shrunk_table_drops_its_stale_shard_partitions(
    tmp_path: Path, instance: dg.DagsterInstance, resources: dict[str, Any]
) -> None:
    path = write_url_file(tmp_path / "inbox" / "t.txt", [f"http://h/{i}.jpg" for i in range(6)])
    stage(instance, resources, "t", number_sample_per_shard=2)
    write_url_file(path, [f"http://h/{i}.jpg" for i in range(3)])
    stage(instance, resources, "t", number_sample_per_shard=2)
    assert instance.get_dynamic_partitions("shards") == ["t/00000", "t/00001"]


def test_url_tables_errors_name_the_file(
    tmp_path: Path, instance: dg.DagsterInstance, resources: dict[str, Any]
) -> None:
    # A dg.Failure with the message alone: no traceback of ours in the UI, and no retry.
    with pytest.raises(dg.Failure, match=r"url_tables\[nothing\]: no file in the inbox") as failure:
        stage(instance, resources, "nothing")
    assert failure.value.allow_retries is False
    assert failure.value.__cause__ is None
    write_url_file(tmp_path / "inbox" / "bad.csv", ["http://h/1.jpg"])
    with pytest.raises(dg.Failure, match=r"bad\.csv: missing column\(s\) \['caption'\]"):
        stage(instance, resources, "bad", caption_col="caption")


def test_shards_build_a_range_in_one_run_with_per_shard_metadata(
    server: ImageServer, tmp_path: Path, instance: dg.DagsterInstance, resources: dict[str, Any]
) -> None:
    urls = [server.url(p) for p in (*GOOD_IMAGES, *BAD_IMAGES)]
    write_url_file(tmp_path / "inbox" / "t.txt", urls)
    stage(instance, resources, "t", number_sample_per_shard=4, output_format="webdataset", timeout=2)
    result = dg.materialize(
        ASSETS,
        selection=[shards],
        instance=instance,
        resources=resources,
        tags=dict(zip(RANGE, ("t/00000", "t/00002"), strict=True)),
    )
    assert result.success
    events = {e.partition: e for e in result.asset_materializations_for_node("shards")}
    assert sorted(events) == ["t/00000", "t/00001", "t/00002"]
    statuses = instance.get_status_by_partition(shards.key, list(events), shards.partitions_def)  # type: ignore[arg-type]
    assert set(statuses.values()) == {dg.AssetPartitionStatus.MATERIALIZED}  # type: ignore[union-attr]
    meta = {k: v.value for k, v in events["t/00001"].metadata.items()}
    assert meta["count"] == 4
    assert meta["successes"] + meta["failed_to_download"] + meta["failed_to_resize"] == 4  # type: ignore[operator]
    assert meta["bytes_written"] == sum(
        (tmp_path / "datasets" / "t" / f"00001{ext}").stat().st_size for ext in (".tar", ".parquet")
    )
    assert "HTTP Error 404" in str(events["t/00001"].metadata["top_errors"].value)
    total = sum(events[k].metadata["successes"].value for k in events)  # type: ignore[misc]
    assert total == len(GOOD_IMAGES)


def test_shards_spool_images_and_uploads_in_the_workers_spool_dir(
    server: ImageServer,
    tmp_path: Path,
    instance: dg.DagsterInstance,
    resources: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    made: list[tuple[str, str | None]] = []  # (prefix, folder) of every temporary file made

    def recording(make: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            made.append((kwargs.get("prefix", ""), kwargs.get("dir")))
            return make(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(tempfile, "TemporaryFile", recording(tempfile.TemporaryFile))
    monkeypatch.setattr(tempfile, "NamedTemporaryFile", recording(tempfile.NamedTemporaryFile))
    datasets = f"memory://img2ds-spool-{uuid.uuid4().hex[:8]}/datasets"
    resources = {
        "storage": StorageResource(
            inbox=str(tmp_path / "inbox"), staging=str(tmp_path / "staging"), datasets=datasets
        ),
        "workers": WorkersResource(thread_count=8, spool_dir=str(spool)),
    }
    write_url_file(tmp_path / "inbox" / "t.txt", [server.url(p) for p in GOOD_IMAGES])
    stage(instance, resources, "t", output_format="webdataset")
    assert dg.materialize(
        ASSETS, selection=[shards], partition_key="t/00000", instance=instance, resources=resources
    ).success

    ours = {(prefix, folder) for prefix, folder in made if prefix.startswith("img2ds-")}
    assert ours == {("img2ds-spool-", str(spool)), ("img2ds-upload-", str(spool))}
    assert list(spool.iterdir()) == []  # nothing left behind
    fs, root = fsspec.core.url_to_fs(f"{datasets}/t")
    assert sorted(p.rsplit("/", 1)[1] for p in fs.find(root)) == [
        "00000.parquet",
        "00000.tar",
        "00000_stats.json",
    ]


def test_a_spool_dir_that_is_not_a_folder_fails_the_run_once_naming_the_option(
    tmp_path: Path, instance: dg.DagsterInstance, resources: dict[str, Any]
) -> None:
    write_url_file(tmp_path / "inbox" / "t.txt", ["http://127.0.0.1:9/a.jpg"])
    stage(instance, resources, "t")
    missing = tmp_path / "no-such-folder"
    result = dg.materialize(
        ASSETS,
        selection=[shards],
        partition_key="t/00000",
        instance=instance,
        resources={**resources, "workers": WorkersResource(spool_dir=str(missing))},
        raise_on_error=False,
    )
    assert not result.success
    (failure,) = [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE]
    assert f"workers.spool_dir: '{missing}' is not a folder on this machine" in str(
        failure.step_failure_data.error
    )
    assert not [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_UP_FOR_RETRY]


def test_download_stats_aggregates_every_table(
    server: ImageServer, tmp_path: Path, instance: dg.DagsterInstance, resources: dict[str, Any]
) -> None:
    for table, paths in {"a": [*GOOD_IMAGES], "b": ["/status/404", "/gen/10x10.jpg"]}.items():
        write_url_file(tmp_path / "inbox" / f"{table}.txt", [server.url(p) for p in paths])
        stage(instance, resources, table, number_sample_per_shard=3, output_format="dummy")
        keys = [k for k in instance.get_dynamic_partitions("shards") if k.startswith(f"{table}/")]
        dg.materialize(
            ASSETS,
            selection=[shards],
            instance=instance,
            resources=resources,
            tags=dict(zip(RANGE, (keys[0], keys[-1]), strict=True)),
        )
    result = dg.materialize(ASSETS, selection=[download_stats], instance=instance, resources=resources)
    (event,) = result.asset_materializations_for_node("download_stats")
    meta = {k: v.value for k, v in event.metadata.items()}
    assert (meta["tables"], meta["shards"], meta["count"]) == (2, 3, len(GOOD_IMAGES) + 2)
    assert (meta["successes"], meta["failed_to_download"]) == (len(GOOD_IMAGES) + 1, 1)
    assert "| b | 1 | 2 | 1 | 50.0% | 1 | 0 |" in str(meta["summary"])
    written = json.loads((tmp_path / "datasets" / "download_stats.json").read_text())
    assert written["totals"]["count"] == len(GOOD_IMAGES) + 2
    assert written["top_errors"] == [{"table": "b", "error": "HTTP Error 404: Not Found", "count": 1}]


def test_download_stats_is_refreshed_after_every_shard_change(instance: dg.DagsterInstance) -> None:
    def tick(cursor: str | None) -> dg.SensorResult | dg.SkipReason:
        return download_stats_sensor(dg.build_sensor_context(instance=instance, cursor=cursor))  # type: ignore[return-value]

    def shard_changed() -> None:
        instance.report_runless_asset_event(dg.AssetMaterialization(asset_key="shards", partition="t/00000"))

    instance.add_dynamic_partitions("shards", ["t/00000"])
    assert isinstance(tick(None), dg.SkipReason)
    shard_changed()
    first = tick(None)
    assert isinstance(first, dg.SensorResult)
    assert len(first.run_requests or []) == 1
    assert isinstance(tick(first.cursor), dg.SkipReason)  # nothing new since that refresh
    shard_changed()
    second = tick(first.cursor)
    assert isinstance(second, dg.SensorResult)
    assert len(second.run_requests or []) == 1
    assert int(second.cursor or 0) > int(first.cursor or 0)


def test_code_location_loads_with_the_asset_graph() -> None:
    dg.Definitions.validate_loadable(defs)
    graph = defs.resolve_asset_graph()
    assert graph.get(shards.key).parent_keys == {url_tables.key}
    assert graph.get(download_stats.key).parent_keys == {shards.key}
    mapping = graph.get_partition_mapping(shards.key, url_tables.key)
    assert isinstance(mapping, dg.SpecificPartitionsPartitionMapping)
    assert graph.get(bucketed_dataset.key).parent_keys == {shards.key}
    sensors = {s.name: s.job_name for s in defs.get_repository_def().sensor_defs}
    # Named jobs, not Dagster's unnamed asset job, in the launchpad and on every sensor's runs.
    assert sensors == {
        "url_drop_sensor": "stage_table",
        "new_shards_sensor": "build_shards",
        "download_stats_sensor": "refresh_stats",
        "bucketed_dataset_sensor": "export_buckets",
    }


def test_dagster_cli_validates_the_workspace(tmp_path: Path) -> None:
    env = {**os.environ, "DAGSTER_HOME": str(ROOT), "IMG2DS_DAGSTER_STORAGE": str(tmp_path)}
    result = subprocess.run(
        [str(Path(sys.executable).parent / "dagster"), "definitions", "validate", "-w", "workspace.yaml"],
        check=False,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "Validation successful" in result.stdout + result.stderr


def test_dg_lists_the_projects_definitions(tmp_path: Path) -> None:
    """`dg dev` and `dg launch` find the code location through [tool.dg] in pyproject.toml."""
    env = {
        **os.environ,
        "DAGSTER_HOME": str(ROOT),
        "IMG2DS_DAGSTER_STORAGE": str(tmp_path),
        "VIRTUAL_ENV": str(Path(sys.executable).parents[1]),
    }
    result = subprocess.run(
        [str(Path(sys.executable).parent / "dg"), "list", "defs", "--json"],
        check=False,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assets = {a["asset_key"] for a in found["assets"]}
    assert assets == {"url_tables", "shards", "download_stats", "bucketed_dataset"}
    assert {j["name"] for j in found["jobs"]} >= {
        "stage_table",
        "build_shards",
        "refresh_stats",
        "export_buckets",
    }
