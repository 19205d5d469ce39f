"""The shard checks (engine/verify.py): a shard as download() writes it is complete in every output
format, and each kind of damage done to it on purpose is found and named."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import BAD_IMAGES, GOOD_IMAGES, write_url_file
from imageserver import ImageServer

from img2ds_dagster import download
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
