"""distributor="ray" on a real two-node Ray cluster on 127.0.0.1 (a head and one more node, one CPU
each), writing to the S3 test server: every shard built once, on both nodes, byte for byte what the
in-process distributor writes; a node killed mid-run loses nothing; the Dagster shards asset and
download() run their shards there."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import ray
from clusters import (
    BUCKET,
    assert_every_row_once,
    build_all,
    in_process_tars,
    s3_for_clusters,
    shard_files,
    shard_stats,
    stage_table,
    started_shards,
    workers_seen,
)
from conftest import write_url_file
from dagster._core.execution.backfill import BulkActionStatus
from dagster._core.storage.tags import BACKFILL_ID_TAG
from dagster_support import add_asset_backfill, daemon_workspace, run_backfill_to_end, statuses
from imageserver import ImageServer
from ray.cluster_utils import Cluster

from img2ds_dagster import definitions, download
from img2ds_dagster.defs.partitions import shard_keys
from img2ds_dagster.defs.resources import StorageResource, WorkersResource
from img2ds_dagster.defs.shards import shards
from img2ds_dagster.engine.shard import ShardResult, Workers
from img2ds_dagster.errors import ConfigError
from img2ds_dagster.runner import AssetRunner

RAY = Workers(distributor="ray", thread_count=4)
# A small object store per node. The nodes take this machine's own address (cluster_utils gives the
# head's GCS that address whatever the nodes bind to), so the cluster's traffic stays on this machine.
NODE: dict[str, Any] = {"object_store_memory": 80 << 20}
# Each URL answers 429 (Retry-After: 1) once, then the image: a shard takes a second or more.
SLOW = "/retry-after/1/1/gen/64x48.jpg"


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[Cluster, Any]]:
    """The cluster, started once the S3 variables are set (its workers inherit them); yields it
    and its second node."""
    with s3_for_clusters():
        ray_cluster = Cluster(
            initialize_head=True,
            head_node_args={"num_cpus": 1, "include_dashboard": False, **NODE},
        )
        second = ray_cluster.add_node(num_cpus=1, **NODE)
        ray.init(address=ray_cluster.address, log_to_driver=False)
        ray_cluster.wait_for_nodes()
        try:
            yield ray_cluster, second
        finally:
            ray.shutdown()
            ray_cluster.shutdown()


def test_every_shard_once_on_both_nodes_and_byte_identical(
    cluster: tuple[Cluster, Any], server: ImageServer, tmp_path: Path
) -> None:
    staging, manifest = stage_table(server, tmp_path, f"s3://{BUCKET}/identical", "t", shards=6, path=SLOW)
    results = build_all(staging, manifest, RAY)
    assert all(isinstance(r, ShardResult) for r in results.values()), results
    assert_every_row_once(manifest)
    seen = workers_seen(manifest)
    assert len({w.split(" (")[0] for w in seen}) == 2, seen  # "ray node <id> (host pid n)": two ids
    assert shard_files(manifest) == in_process_tars(server, tmp_path, "t", shards=6, path=SLOW)


def test_local_paths_are_refused_on_a_cluster_of_several_nodes(
    cluster: tuple[Cluster, Any], server: ImageServer, tmp_path: Path
) -> None:
    staging, manifest = stage_table(server, tmp_path, str(tmp_path / "data"), "t", shards=1)
    with pytest.raises(
        ConfigError, match=r"distributor='ray': the cluster has 2 nodes, and the staging area"
    ):
        build_all(staging, manifest, RAY)
    # A mount every node shares, declared as such, is accepted.
    results = build_all(staging, manifest, Workers(distributor="ray", thread_count=4, shared_filesystem=True))
    assert all(isinstance(r, ShardResult) for r in results.values())


def test_the_shards_asset_records_each_shard_built_on_the_cluster(
    cluster: tuple[Cluster, Any], server: ImageServer, tmp_path: Path
) -> None:
    urls = [server.url(f"/gen/64x48.jpg?dagster={i}") for i in range(12)]
    source = write_url_file(tmp_path / "d.csv", urls)
    storage = StorageResource(
        inbox=str(tmp_path / "inbox"), staging=f"s3://{BUCKET}/dg/staging", datasets=f"s3://{BUCKET}/dg/out"
    )
    workers = WorkersResource(distributor="ray", thread_count=4)
    with dg.instance_for_test() as instance:
        runner = AssetRunner(instance, {"storage": storage, "workers": workers})
        manifest = runner.stage_table("d", {"source": str(source), "number_sample_per_shard": 3})
        keys = shard_keys(manifest)
        outcome = runner.build_shards(keys)  # one run over the range, as a backfill's
        assert outcome.built == keys
        assert not outcome.failed
        materialized = instance.get_materialized_partitions(shards.key)
        assert materialized == set(keys)
        workers_of = {
            record.partition_key: record.asset_materialization.metadata["worker"].value  # type: ignore[union-attr]
            for record in instance.fetch_materializations(shards.key, limit=100).records
        }
        assert set(workers_of) == set(keys)
        assert all(str(w).startswith("ray node ") for w in workers_of.values())


def test_a_backfill_of_shards_through_the_daemon_runs_them_on_the_cluster(
    cluster: tuple[Cluster, Any], server: ImageServer, tmp_path: Path
) -> None:
    """The code location configured for the cluster by its variables, a backfill as the UI makes it,
    the backfill daemon's runs: each shard materialized, built on a Ray node."""
    root = f"s3://{BUCKET}/backfill"
    location = {
        "IMG2DS_STAGING": f"{root}/staging",
        "IMG2DS_DATASETS": f"{root}/out",
        "IMG2DS_DISTRIBUTOR": "ray",
        "IMG2DS_CLUSTER": cluster[0].address,
        "IMG2DS_SHARDS_PER_RUN": "3",
    }
    urls = [server.url(f"/gen/64x48.jpg?backfill={i}") for i in range(10)]
    source = write_url_file(tmp_path / "b.csv", urls)
    try:
        with pytest.MonkeyPatch.context() as env:
            env.chdir(tmp_path)
            for name, value in location.items():
                env.setenv(name, value)
            # The runs execute in this process, from the code location's module: loaded again with
            # these variables (and again below without them, for the tests after this one).
            importlib.reload(definitions)
            backfill_on_the_cluster(source)
    finally:
        importlib.reload(definitions)


def backfill_on_the_cluster(source: Path) -> None:
    with (
        dg.instance_for_test(synchronous_run_launcher=True, synchronous_run_coordinator=True) as instance,
        daemon_workspace(instance) as ctx,
    ):
        runner = AssetRunner(instance, dict(definitions.defs.resources or {}))
        keys = shard_keys(runner.stage_table("b", {"source": str(source), "number_sample_per_shard": 2}))
        backfill_id = add_asset_backfill(ctx, shards.key, keys)
        assert run_backfill_to_end(ctx, backfill_id) == BulkActionStatus.COMPLETED_SUCCESS
        assert statuses(instance, keys) == dict.fromkeys(keys, dg.AssetPartitionStatus.MATERIALIZED)
        runs = instance.get_run_records(filters=dg.RunsFilter(tags={BACKFILL_ID_TAG: backfill_id}))
        assert len(runs) == 2  # 5 shards, 3 per run
        workers_of = [
            record.asset_materialization.metadata["worker"].value  # type: ignore[union-attr]
            for record in instance.fetch_materializations(shards.key, limit=100).records
        ]
        assert len(workers_of) == len(keys)
        assert all(str(w).startswith("ray node ") for w in workers_of)


def test_download_with_the_ray_distributor_to_s3(
    cluster: tuple[Cluster, Any], server: ImageServer, tmp_path: Path
) -> None:
    urls = [server.url(f"/gen/64x48.jpg?download={i}") for i in range(8)]
    source = write_url_file(tmp_path / "urls.txt", urls)
    out = f"s3://{BUCKET}/download"
    report = download(
        str(source), output_folder=out, distributor="ray", number_sample_per_shard=4, thread_count=4
    )
    assert report.shards_built == ["urls/00000", "urls/00001"]
    assert report.totals["successes"] == 8


def test_img2ds_download_with_the_ray_distributor_from_the_shell(
    cluster: tuple[Cluster, Any], server: ImageServer, tmp_path: Path
) -> None:
    urls = [server.url(f"/gen/64x48.jpg?shell={i}") for i in range(4)]
    source = write_url_file(tmp_path / "shell.txt", urls)
    env = {**os.environ, "RAY_ADDRESS": cluster[0].address}  # the S3 variables are in os.environ
    out = f"s3://{BUCKET}/shell"
    command = [sys.executable, "-m", "img2ds_dagster.cli", "download", str(source), "--output_folder", out]
    done = subprocess.run(
        [*command, "--distributor", "ray", "--number_sample_per_shard", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert f"{out}: 4 of 4 images in 2 shards" in done.stdout


def test_a_node_killed_mid_run_loses_nothing(
    cluster: tuple[Cluster, Any], server: ImageServer, tmp_path: Path
) -> None:
    """Last in this module: the cluster has one node after it."""
    ray_cluster, second = cluster
    staging, manifest = stage_table(server, tmp_path, f"s3://{BUCKET}/killed", "k", shards=6, path=SLOW)
    out: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: out.update(results=build_all(staging, manifest, RAY)))
    thread.start()
    # Both nodes (one CPU each) are building a shard once two shards' URLs have been asked for; each
    # shard then waits a second (the 429's Retry-After) before its images.
    started = started_shards(server, "k", 6)
    while len(started()) < 2 and thread.is_alive():
        time.sleep(0.05)
    killed_at = time.time()
    ray_cluster.remove_node(second, allow_graceful=False)
    thread.join(timeout=300)
    assert not thread.is_alive(), "the run did not finish"
    results = out["results"]
    # The second node's shards still under way when it died were built again on the head: a shard
    # whose stats name the dead node had ended before it died. (Usually none does; under load the
    # head's first worker can start so late that the second node finishes a shard first.)
    dead = f"ray node {second.node_id[:12]}"
    for stats in shard_stats(manifest):
        if stats["worker"].startswith(dead):
            assert stats["end_time"] < killed_at, stats["worker"]
    assert len({w.split(" (")[0] for w in workers_seen(manifest) if not w.startswith(dead)}) == 1
    assert all(isinstance(r, ShardResult) for r in results.values()), results
    assert_every_row_once(manifest)
    assert shard_files(manifest) == in_process_tars(server, tmp_path, "k", shards=6, path=SLOW)
