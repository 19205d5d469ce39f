"""The pipeline on a real PostgreSQL server, with the storage and concurrency settings of the
production profile (deploy/ecs/dagster.yaml): a table staged, then two shard runs in two
``dagster asset materialize`` processes at once, both writing to the same instance.

The server is a throwaway cluster (initdb + pg_ctl from Debian's ``postgresql`` package, which
``tests/system-packages.sh`` installs) on 127.0.0.1 and a free port. Without those binaries the
test fails: it does not skip.
"""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import dagster as dg
import psycopg2
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import BAD_IMAGES, GOOD_IMAGES, write_url_file
from imageserver import SAMPLES_DIR, ImageServer
from realservers import PostgresServer, postgres_server

from img2ds_dagster.defs.partitions import SHARDS, URL_TABLES
from img2ds_dagster.defs.resources import StorageResource, WorkersResource
from img2ds_dagster.defs.shards import shards
from img2ds_dagster.defs.stats import download_stats
from img2ds_dagster.defs.url_tables import url_tables

pytestmark = pytest.mark.slow

ROOT = Path(__file__).parents[1]
PROFILE = ROOT / "deploy" / "ecs" / "dagster.yaml"
ASSETS = [url_tables, shards, download_stats]
# The rendezvous answers once both shard runs are downloading; well within the fetch timeout.
RENDEZVOUS_WAIT = 30.0
FETCH_TIMEOUT = 45.0


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server of its own, stopped and deleted afterwards."""
    with postgres_server() as server:
        yield server


class Rendezvous:
    """An HTTP server on 127.0.0.1 whose requests are answered (with a real JPEG) only once
    ``parties`` of them are waiting together: a sample downloaded from it in each of two shard runs
    proves that the runs were downloading at the same time. Alone, a request gets a 503 after
    ``wait`` seconds."""

    def __init__(self, parties: int, wait: float) -> None:
        barrier = threading.Barrier(parties, timeout=wait)
        image = (SAMPLES_DIR / "chelsea_320x320.jpg").read_bytes()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                try:
                    barrier.wait()
                except threading.BrokenBarrierError:
                    self.send_error(503, "the other shard run never came")
                    return
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(image)))
                self.end_headers()
                self.wfile.write(image)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def url(self, name: str) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}/{name}.jpg"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


@pytest.fixture
def rendezvous() -> Iterator[Rendezvous]:
    server = Rendezvous(parties=2, wait=RENDEZVOUS_WAIT)
    yield server
    server.close()


def profile_home(home: Path) -> Path:
    """A DAGSTER_HOME whose dagster.yaml has the production profile's storage and concurrency."""
    profile = yaml.safe_load(PROFILE.read_text())
    config = {
        "storage": profile["storage"],
        "concurrency": profile["concurrency"],
        "telemetry": {"enabled": False},
    }
    home.mkdir(parents=True)
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))
    return home


def test_two_shard_runs_at_once_on_postgres(
    postgres: PostgresServer,
    server: ImageServer,
    rendezvous: Rendezvous,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = tmp_path / "data"
    env = {
        **postgres.env(),
        "DAGSTER_HOME": str(profile_home(tmp_path / "dagster_home")),
        "IMG2DS_INBOX": str(data / "inbox"),
        "IMG2DS_STAGING": str(data / "staging"),
        "IMG2DS_DATASETS": str(data / "datasets"),
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    storage = StorageResource(
        inbox=env["IMG2DS_INBOX"], staging=env["IMG2DS_STAGING"], datasets=env["IMG2DS_DATASETS"]
    )
    resources = {"storage": storage, "workers": WorkersResource(thread_count=16)}

    # Shard 00000: a rendezvous URL and every good image; shard 00001: a rendezvous URL and every bad one.
    good = [rendezvous.url("r0"), *(server.url(p) for p in GOOD_IMAGES)]
    bad = [rendezvous.url("r1"), *(server.url(p) for p in BAD_IMAGES)]
    assert len(good) > len(bad)
    source = write_url_file(tmp_path / "sources" / "t.txt", good + bad)

    instance = dg.DagsterInstance.from_config(env["DAGSTER_HOME"])
    try:
        instance.add_dynamic_partitions(URL_TABLES, ["t"])
        config = {
            "source": str(source),
            "number_sample_per_shard": len(good),
            "output_format": "webdataset",
            "timeout": FETCH_TIMEOUT,
        }
        staged = dg.materialize(
            ASSETS,
            selection=[url_tables],
            partition_key="t",
            instance=instance,
            resources=resources,
            run_config={"ops": {"url_tables": {"config": config}}},
        )
        assert staged.success
        keys = ["t/00000", "t/00001"]
        assert instance.get_dynamic_partitions(SHARDS) == keys

        # Two processes, as two run workers of a cluster would be, each materializing one shard.
        dagster_cli = str(Path(sys.executable).parent / "dagster")
        runs = [
            subprocess.Popen(
                [
                    *(dagster_cli, "asset", "materialize", "-m", "img2ds_dagster.definitions"),
                    *("--select", "shards", "--partition", key),
                ],
                cwd=tmp_path,
                env={**os.environ, **env},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for key in keys
        ]
        outputs = [run.communicate(timeout=180)[0] for run in runs]
        for key, run, output in zip(keys, runs, outputs, strict=True):
            assert run.returncode == 0, f"{key}:\n{output}"

        statuses = instance.get_status_by_partition(shards.key, keys, shards.partitions_def)  # type: ignore[arg-type]
        assert statuses == dict.fromkeys(keys, dg.AssetPartitionStatus.MATERIALIZED)
        for key in keys:
            (record,) = instance.get_run_records(dg.RunsFilter(tags={"dagster/partition": key}))
            assert record.dagster_run.status == dg.DagsterRunStatus.SUCCESS
            assert record.dagster_run.asset_selection == {shards.key}

        folder = data / "datasets" / "t"
        for name in ("00000", "00001"):
            for suffix in (".tar", ".parquet", "_stats.json"):
                assert (folder / f"{name}{suffix}").stat().st_size > 0, f"{name}{suffix}"
        rows = {
            name: {r["url"]: r for r in pq.read_table(folder / f"{name}.parquet").to_pylist()}
            for name in ("00000", "00001")
        }
        # The rendezvous answered both: the two runs were downloading at the same time.
        assert rows["00000"][rendezvous.url("r0")]["status"] == "success", rows["00000"][rendezvous.url("r0")]
        assert rows["00001"][rendezvous.url("r1")]["status"] == "success", rows["00001"][rendezvous.url("r1")]
        assert {rows["00000"][server.url(p)]["status"] for p in GOOD_IMAGES} == {"success"}
        assert {server.url(p): rows["00001"][server.url(p)]["status"] for p in BAD_IMAGES} == {
            server.url(p): status for p, status in BAD_IMAGES.items()
        }

        stats = dg.materialize(ASSETS, selection=[download_stats], instance=instance, resources=resources)
        (event,) = stats.asset_materializations_for_node("download_stats")
        meta = {k: v.value for k, v in event.metadata.items()}
        failures = list(BAD_IMAGES.values())
        assert (meta["tables"], meta["shards"], meta["count"]) == (1, 2, len(good) + len(bad))
        assert meta["successes"] == len(good) + 1
        assert meta["failed_to_download"] == failures.count("failed_to_download")
        assert meta["failed_to_resize"] == failures.count("failed_to_resize")
    finally:
        instance.dispose()

    # Everything above went through that server: staging, both shard runs and the stats run.
    connect = {"host": postgres.host, "port": postgres.port, "user": postgres.user, "dbname": postgres.db}
    with closing(psycopg2.connect(**connect)) as conn, conn.cursor() as cursor:
        cursor.execute("SELECT status, count(*) FROM runs GROUP BY status")
        assert dict(cursor.fetchall()) == {"SUCCESS": 4}
