"""The shard checks (engine/verify.py): a shard as download() writes it is complete in every output
format, and each kind of damage done to it on purpose is found and named."""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path
from typing import Any

import dagster as dg
import pyarrow.parquet as pq
import pytest
from conftest import BAD_IMAGES, GOOD_IMAGES, write_url_file
from imageserver import ImageServer

from img2ds_dagster import download
from img2ds_dagster.defs.resources import StorageResource, WorkersResource
from img2ds_dagster.defs.shards import shards
from img2ds_dagster.defs.stats import download_stats
from img2ds_dagster.defs.url_tables import url_tables
from img2ds_dagster.engine import verify
from img2ds_dagster.engine.verify import WrittenShard, verify_shard

ROWS = len(GOOD_IMAGES) + len(BAD_IMAGES)


def build(server: ImageServer, folder: Path, output_format: str) -> WrittenShard:
    urls = [server.url(p) for p in (*GOOD_IMAGES, *BAD_IMAGES)]
    url_file = write_url_file(folder / "urls.parquet", urls, captions=[f"c{i}" for i in range(ROWS)])
    download(
        str(url_file),
        output_folder=str(folder / "out"),
        input_format="parquet",
        caption_col="caption",
        output_format=output_format,
        timeout=5,
        retries=0,
    )
    return WrittenShard(str(folder / "out"), "00000", output_format, "jpg", ROWS, save_caption=True)


@pytest.mark.parametrize("output_format", ["webdataset", "files", "parquet", "tfrecord", "dummy"])
def test_a_written_shard_is_complete(server: ImageServer, tmp_path: Path, output_format: str) -> None:
    report = verify_shard(build(server, tmp_path, output_format))
    assert report.problems == []
    assert (report.rows, report.successes) == (ROWS, len(GOOD_IMAGES))
    assert report.success_rate == pytest.approx(len(GOOD_IMAGES) / ROWS)


def test_a_missing_member_an_extra_one_and_a_doubled_one_are_named(
    server: ImageServer, tmp_path: Path
) -> None:
    shard = build(server, tmp_path, "webdataset")
    tar_path = Path(shard.folder) / "00000.tar"
    with tarfile.open(tar_path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]  # type: ignore[union-attr]
    dropped = members[0][0].name
    with tarfile.open(tar_path, "w") as tar:
        for member, data in [*members[1:], members[1], (tarfile.TarInfo("stray.jpg"), b"x")]:
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    problems = verify_shard(shard).problems
    assert problems == [
        f"1 files of successful samples missing, e.g. ['{dropped}']",
        "1 files that no successful sample has, e.g. ['stray.jpg']",
        f"1 files written twice, e.g. ['{members[1][0].name}']",
    ]


def _rewritten(tar_path: Path, tar_format: int, long_name: bool) -> str:
    """The tar written again by tarfile in ``tar_format``, with a stray member (its name over 100
    bytes when ``long_name``: a pax or GNU long-name header); returns the stray member's name."""
    with tarfile.open(tar_path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]  # type: ignore[union-attr]
    stray = tarfile.TarInfo(("d" * 120 + "/" if long_name else "") + "stray.jpg")
    with tarfile.open(tar_path, "w", format=tar_format) as tar:
        for member, data in [*members, (stray, b"x")]:
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    return stray.name


@pytest.mark.parametrize(
    ("tar_format", "long_name"),
    [
        (tarfile.USTAR_FORMAT, False),
        (tarfile.GNU_FORMAT, False),
        (tarfile.GNU_FORMAT, True),
        (tarfile.PAX_FORMAT, True),
    ],
)
def test_a_tar_in_any_format_is_read_as_tarfile_reads_it(
    server: ImageServer, tmp_path: Path, tar_format: int, long_name: bool
) -> None:
    # The checks read plain USTAR tars themselves and hand anything else to tarfile.
    shard = build(server, tmp_path, "webdataset")
    stray = _rewritten(Path(shard.folder) / "00000.tar", tar_format, long_name)
    assert verify_shard(shard).problems == [f"1 files that no successful sample has, e.g. ['{stray}']"]


def _verdict(shard: WrittenShard) -> list[str] | str:
    try:
        return verify_shard(shard).problems
    except Exception as err:  # the verdict compared is whatever happens
        return f"{type(err).__name__}: {err}"


@pytest.mark.parametrize("damage", ["truncated in a member", "truncated in a header", "bad checksum"])
def test_a_damaged_tar_gets_tarfiles_verdict(
    server: ImageServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: str
) -> None:
    shard = build(server, tmp_path, "webdataset")
    tar_path = Path(shard.folder) / "00000.tar"
    with tarfile.open(tar_path) as tar:
        offsets = [m.offset for m in tar.getmembers()]
    raw = bytearray(tar_path.read_bytes())
    cut = offsets[len(offsets) // 2]
    if damage == "truncated in a member":
        raw = raw[: cut + 700]
    elif damage == "truncated in a header":
        raw = raw[: cut + 100]
    else:
        raw[cut] ^= 0x01  # a byte of its name: its checksum no longer matches
    tar_path.write_bytes(bytes(raw))
    ours = _verdict(shard)
    monkeypatch.setattr(verify, "_plain_tar_names", lambda *_: None)  # tarfile alone
    assert ours == _verdict(shard)
    assert ours  # and it is not taken for a complete shard


def test_metadata_that_disagrees_with_the_staging_or_the_stats_is_named(
    server: ImageServer, tmp_path: Path
) -> None:
    shard = build(server, tmp_path, "files")
    parquet = Path(shard.folder) / "00000.parquet"
    table = pq.read_table(parquet)
    pq.write_table(table.slice(0, ROWS - 1), parquet)  # the last row lost
    stats = Path(shard.folder) / "00000_stats.json"
    data = json.loads(stats.read_text())
    stats.write_text(json.dumps({**data, "successes": data["successes"] + 1}))
    problems = verify_shard(shard).problems
    assert f"{ROWS - 1} metadata rows for {ROWS} staged input rows" in problems
    assert f"stats count {ROWS} != {ROWS - 1} in the metadata" in problems
    assert f"stats successes {len(GOOD_IMAGES) + 1} != {len(GOOD_IMAGES)} in the metadata" in problems
    (Path(shard.folder) / "00000").rename(Path(shard.folder) / "moved")
    assert "00000: its files file is missing" in verify_shard(shard).problems


def test_a_parquet_shard_without_an_image_is_named(server: ImageServer, tmp_path: Path) -> None:
    shard = build(server, tmp_path, "parquet")
    parquet = Path(shard.folder) / "00000.parquet"
    rows = pq.read_table(parquet).to_pylist()
    first_ok = next(r for r in rows if r["status"] == "success")
    first_ok["jpg"] = None
    pq.write_table(pq.read_table(parquet).from_pylist(rows, schema=pq.read_schema(parquet)), parquet)
    assert verify_shard(shard).problems == ["1 successful samples without images in the parquet"]


# The checks as the shards asset records them, per partition.


def _check_records(instance: dg.DagsterInstance, name: str) -> dict[str | None, Any]:
    key = dg.AssetCheckKey(dg.AssetKey("shards"), name)
    records = instance.event_log_storage.get_asset_check_execution_history(key, limit=100)
    latest: dict[str | None, Any] = {}
    for record in records:  # newest first
        latest.setdefault(record.partition, record)
    return latest


def test_the_shards_asset_records_its_checks_per_shard(server: ImageServer, tmp_path: Path) -> None:
    good = [server.url(p) for p in GOOD_IMAGES][:4]
    bad = [server.url("/status/404")] * 4
    write_url_file(tmp_path / "inbox" / "t.txt", good + bad)  # shard 0 all good, shard 1 all 404s
    resources = {
        "storage": StorageResource(
            inbox=str(tmp_path / "inbox"),
            staging=str(tmp_path / "staging"),
            datasets=str(tmp_path / "datasets"),
        ),
        "workers": WorkersResource(thread_count=8),
    }
    assets = [url_tables, shards, download_stats]
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("url_tables", ["t"])
        config = {
            "number_sample_per_shard": 4,
            "output_format": "webdataset",
            "timeout": 5,
            "min_success_rate": 0.5,
        }
        dg.materialize(
            assets,
            selection=[url_tables],
            partition_key="t",
            instance=instance,
            resources=resources,
            run_config={"ops": {"url_tables": {"config": config}}},
        )
        ranged = dg.materialize(
            assets,
            selection=[shards],
            instance=instance,
            resources=resources,
            tags={
                "dagster/asset_partition_range_start": "t/00000",
                "dagster/asset_partition_range_end": "t/00001",
            },
        )
        assert ranged.success  # a low success rate warns, it does not fail the run
        logged = [e.message for e in instance.all_logs(ranged.run_id) if "this run:" in (e.message or "")]
        assert len(logged) == 2
        pattern = r"t/0000\d done; this run: 2 of 2 shards, 8 images \(50\.0% ok\), [\d,]+ images/s"
        assert re.fullmatch(pattern, logged[-1])
        complete, rate = (
            _check_records(instance, "shard_is_complete"),
            _check_records(instance, "success_rate"),
        )
        assert {k: r.status.value for k, r in complete.items() if k} == {
            "t/00000": "SUCCEEDED",
            "t/00001": "SUCCEEDED",
        }
        assert {k: r.status.value for k, r in rate.items() if k} == {
            "t/00000": "SUCCEEDED",
            "t/00001": "FAILED",
        }
        evaluation = rate["t/00001"].event.dagster_event.event_specific_data
        assert evaluation.severity == dg.AssetCheckSeverity.WARN
        assert evaluation.metadata["success_rate"].value == 0.0
        # The run's own result per check counts the shards.
        summary = rate[None].event.dagster_event.event_specific_data
        assert summary.description == "1 of 2 shards of this run passed"
        # The contact sheet of the good shard, an image in markdown.
        (event,) = [e for e in ranged.asset_materializations_for_node("shards") if e.partition == "t/00000"]
        assert str(event.metadata["contact_sheet"].value).startswith(
            "![contact sheet](data:image/jpeg;base64,"
        )
        # One shard in a run of its own: Dagster gives the result its partition.
        single = dg.materialize(
            assets, selection=[shards], partition_key="t/00001", instance=instance, resources=resources
        )
        assert single.success
        assert _check_records(instance, "shard_is_complete")["t/00001"].run_id == single.run_id
