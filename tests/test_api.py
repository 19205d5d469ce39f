"""``download()`` and ``img2ds download``: img2dataset's entry points, running the Dagster assets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import dagster as dg
import pyarrow.parquet as pq
import pytest
from conftest import BAD_IMAGES, GOOD_IMAGES, write_url_file
from dagster._core.definitions.data_version import DATA_VERSION_TAG
from imageserver import ImageServer

from img2ds_dagster import download
from img2ds_dagster.api import fresh_names
from img2ds_dagster.defs.shards import recorded_fingerprints
from img2ds_dagster.engine import distribute
from img2ds_dagster.errors import ConfigError, InputTableError, ShardError

FAST = {"thread_count": 8, "timeout": 2}


def visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def rows(folder: Path) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    for path in sorted(folder.glob("*.parquet")):
        out += pq.read_table(path).to_pylist()
    return out


@pytest.mark.parametrize("output_format", ["files", "webdataset", "parquet", "dummy"])
def test_output_layout_is_img2datasets(server: ImageServer, tmp_path: Path, output_format: str) -> None:
    urls = [server.url(p) for p in (*GOOD_IMAGES, *BAD_IMAGES)]
    url_list = write_url_file(tmp_path / "urls.txt", urls)
    out = tmp_path / "out"
    report = download(
        url_list=str(url_list),
        output_folder=str(out),
        output_format=output_format,
        number_sample_per_shard=6,
        **FAST,
    )
    expected = {
        "files": ["00000", "00000.parquet", "00000_stats.json", "00001", "00001.parquet", "00001_stats.json"],
        "webdataset": ["00000.parquet", "00000.tar", "00000_stats.json", "00001.parquet", "00001.tar"],
        "parquet": ["00000.parquet", "00000_stats.json", "00001.parquet", "00001_stats.json"],
        "dummy": ["00000_stats.json", "00001_stats.json"],
    }[output_format]
    if output_format == "webdataset":
        expected = [*expected, "00001_stats.json"]
    assert visible(out) == sorted(expected)
    assert (out / ".img2ds").is_dir()
    assert report.shards_built == ["urls/00000", "urls/00001"]
    assert report.totals["count"] == len(urls)
    assert report.totals["successes"] == len(GOOD_IMAGES)
    if output_format != "dummy":
        assert [r["url"] for r in rows(out)] == urls
        assert [r["key"] for r in rows(out)] == [f"00000{i}" for i in range(6)] + [
            f"00001{i}" for i in range(5)
        ]
    if output_format == "files":
        assert sorted(p.name for p in (out / "00000").iterdir())[:2] == ["000000.jpg", "000000.json"]


def test_a_folder_of_files_numbers_shards_across_files(server: ImageServer, tmp_path: Path) -> None:
    folder = tmp_path / "lists"
    write_url_file(folder / "part_a.csv", [server.url("/gen/11x11.jpg")] * 2, captions=["a1", "a2"])
    write_url_file(folder / "part_b.csv", [server.url("/gen/12x12.jpg")], captions=["b1"])
    write_url_file(folder / "ignored.txt", [server.url("/gen/13x13.jpg")])
    out = tmp_path / "out"
    download(
        url_list=str(folder),
        input_format="csv",
        caption_col="caption",
        output_folder=str(out),
        output_format="webdataset",
        number_sample_per_shard=2,
        **FAST,
    )
    assert visible(out) == [f"0000{i}{ext}" for i in (0, 1) for ext in (".parquet", ".tar", "_stats.json")]
    assert [r["caption"] for r in rows(out)] == ["a1", "a2", "b1"]
    assert [r["key"] for r in rows(out)] == ["000000", "000001", "000010"]


def test_a_second_call_skips_finished_shards(server: ImageServer, tmp_path: Path) -> None:
    paths = [f"/gen/{20 + i}x20.jpg?incremental=1" for i in range(4)]
    url_list = write_url_file(tmp_path / "urls.txt", [server.url(p) for p in paths])
    args = {"url_list": str(url_list), "output_folder": str(tmp_path / "out"), "number_sample_per_shard": 2}
    first = download(**args, **FAST)  # type: ignore[arg-type]
    stats_mtime = (tmp_path / "out" / "00000_stats.json").stat().st_mtime_ns
    hits = [server.hits[p] for p in paths]
    second = download(**args, **FAST)  # type: ignore[arg-type]
    assert (first.shards_built, first.shards_skipped) == (["urls/00000", "urls/00001"], [])
    assert (second.shards_built, second.shards_skipped) == ([], ["urls/00000", "urls/00001"])
    assert [server.hits[p] for p in paths] == hits  # nothing downloaded again
    assert (tmp_path / "out" / "00000_stats.json").stat().st_mtime_ns == stats_mtime
    assert second.totals["successes"] == 4


def test_rows_appended_to_the_url_file_are_downloaded_on_the_next_call(
    server: ImageServer, tmp_path: Path
) -> None:
    # Shard 2 holds one row after the first call and two after the second: it must be built again,
    # or the appended row in it would never be downloaded (img2dataset skips it: its stats file exists).
    paths = [f"/gen/{20 + i}x21.jpg?appended=1" for i in range(7)]
    url_list = tmp_path / "urls.txt"
    args = {"url_list": str(url_list), "output_folder": str(tmp_path / "out"), "number_sample_per_shard": 2}
    write_url_file(url_list, [server.url(p) for p in paths[:5]])
    first = download(**args, **FAST)  # type: ignore[arg-type]
    assert first.shards_built == ["urls/00000", "urls/00001", "urls/00002"]
    hits = [server.hits[p] for p in paths]
    write_url_file(url_list, [server.url(p) for p in paths])
    second = download(**args, **FAST)  # type: ignore[arg-type]
    assert (second.shards_built, second.shards_skipped) == (
        ["urls/00002", "urls/00003"],
        ["urls/00000", "urls/00001"],
    )
    assert [r["url"] for r in rows(tmp_path / "out")] == [server.url(p) for p in paths]
    assert [server.hits[p] - h for p, h in zip(paths, hits, strict=True)] == [0, 0, 0, 0, 1, 1, 1]
    assert second.totals["count"] == second.totals["successes"] == 7


def test_an_edited_row_rebuilds_its_shard_only(server: ImageServer, tmp_path: Path) -> None:
    paths = [f"/gen/{20 + i}x22.jpg?edited=1" for i in range(6)]
    url_list = tmp_path / "urls.txt"
    args = {"url_list": str(url_list), "output_folder": str(tmp_path / "out"), "number_sample_per_shard": 2}
    write_url_file(url_list, [server.url(p) for p in paths])
    download(**args, **FAST)  # type: ignore[arg-type]
    edited = [*paths[:3], "/gen/99x22.jpg?edited=1", *paths[4:]]
    write_url_file(url_list, [server.url(p) for p in edited])
    again = download(**args, **FAST)  # type: ignore[arg-type]
    assert (again.shards_built, again.shards_skipped) == (["urls/00001"], ["urls/00000", "urls/00002"])
    assert [r["url"] for r in rows(tmp_path / "out")] == [server.url(p) for p in edited]
    # The same rows a third time: nothing to do.
    third = download(**args, **FAST)  # type: ignore[arg-type]
    assert third.shards_built == []


def test_a_shards_latest_materialization_is_the_one_compared(server: ImageServer, tmp_path: Path) -> None:
    url_list, out = tmp_path / "urls.txt", tmp_path / "out"
    args = {"url_list": str(url_list), "output_folder": str(out), "number_sample_per_shard": 2}
    for variant in ("a", "b"):  # every row edited: both shards are built twice, from other rows
        write_url_file(url_list, [server.url(f"/gen/{20 + i}x23.jpg?v={variant}") for i in range(4)])
        assert download(**args, **FAST).shards_built == ["urls/00000", "urls/00001"]  # type: ignore[arg-type]
    staged = json.loads((out / ".img2ds" / "staging" / "urls" / "table.json").read_text())["fingerprints"]
    keys = ["urls/00000", "urls/00001"]
    with dg.DagsterInstance.from_config(str(out / ".img2ds" / "dagster")) as instance:
        records = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey("shards"), asset_partitions=keys), limit=10
        ).records
        assert sorted(r.partition_key for r in records) == sorted(keys * 2)
        # Each materialization's data version is the fingerprint of the rows it was built from.
        latest = {r.partition_key: r for r in reversed(records)}  # newest first: the last one stays
        assert [latest[k].asset_materialization.tags[DATA_VERSION_TAG] for k in keys] == staged  # type: ignore[union-attr]
        assert recorded_fingerprints(instance, keys) == dict(zip(keys, staged, strict=True))


@pytest.mark.slow
def test_a_failed_shard_is_reported_and_retried_alone_on_the_next_call(
    server: ImageServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = [f"/gen/{40 + i}x30.jpg?retry=1" for i in range(6)]
    url_list = write_url_file(tmp_path / "urls.txt", [server.url(p) for p in paths])
    args = {"url_list": str(url_list), "output_folder": str(tmp_path / "out"), "number_sample_per_shard": 2}
    real_build = distribute.build_shard

    def disk_full_on_shard_1(staging, job, *args, **kwargs):  # type: ignore[no-untyped-def]
        if job.shard_id == 1:
            raise OSError(28, "No space left on device")
        return real_build(staging, job, *args, **kwargs)

    monkeypatch.setattr(distribute, "build_shard", disk_full_on_shard_1)
    with pytest.raises(ShardError, match=r"1 of 3 shards could not be built \(urls/00001\)"):
        download(**args, **FAST)  # type: ignore[arg-type]
    assert not (tmp_path / "out" / "00001_stats.json").exists()
    assert (tmp_path / "out" / "00002_stats.json").exists()

    monkeypatch.setattr(distribute, "build_shard", real_build)
    hits = {p: server.hits[p] for p in paths}
    report = download(**args, **FAST)  # type: ignore[arg-type]
    assert report.shards_built == ["urls/00001"]
    assert [server.hits[p] - hits[p] for p in paths] == [0, 0, 1, 1, 0, 0]


@pytest.mark.slow
def test_a_download_killed_while_writing_a_shard_is_cleaned_up_by_the_next(
    server: ImageServer, tmp_path: Path
) -> None:
    """SIGKILL while a shard's files are written leaves its hidden temporary folder behind; the next
    build of that shard removes it (and nothing else), and the dataset comes out whole."""
    urls = [server.url(f"/gen/{32 + i % 40}x24.jpg?kill={i}") for i in range(1500)]
    args = {
        "url_list": str(write_url_file(tmp_path / "urls.txt", urls)),
        "output_folder": str(tmp_path / "out"),
        "output_format": "files",  # a folder of 4500 files: the longest write of any format
        "number_sample_per_shard": 1500,
        "thread_count": 16,
        "timeout": 10,
    }
    out = tmp_path / "out"
    child = subprocess.Popen(
        [sys.executable, "-c", f"from img2ds_dagster import download; download(**{args!r})"]
    )
    try:
        leftovers: list[str] = []
        deadline = time.monotonic() + 120
        while not leftovers and child.poll() is None and time.monotonic() < deadline:
            leftovers = [n for n in os.listdir(out) if n.startswith(".00000.tmp-")] if out.exists() else []
            time.sleep(0.001)
        child.kill()
    finally:
        child.wait()
    assert leftovers, "the shard was never seen being written"
    assert not (out / "00000_stats.json").exists()
    # Names that are not this shard's temporaries are not touched.
    others = [".00001.tar.tmp-0123456789ab", "00000.tmp-0123456789ab", ".00000.tar.tmp-notours"]
    for name in others:
        (out / name).write_bytes(b"")

    report = download(**args)  # type: ignore[arg-type]
    assert report.shards_built == ["urls/00000"]
    assert sorted(n for n in os.listdir(out) if "tmp-" in n) == sorted(others)
    table = pq.read_table(out / "00000.parquet")
    assert table.column("url").to_pylist() == urls
    assert set(table.column("status").to_pylist()) == {"success"}, set(
        table.column("error_message").to_pylist()
    )
    assert len(os.listdir(out / "00000")) == 3 * len(urls) - len(urls)  # .jpg and .json, no caption


def test_captions_off_and_extra_columns(server: ImageServer, tmp_path: Path) -> None:
    url_list = write_url_file(
        tmp_path / "urls.parquet",
        [server.url("/gen/21x21.jpg")],
        captions=["hidden"],
        extra={"license": ["cc-by"], "score": [0.5]},
    )
    download(
        url_list=str(url_list),
        input_format="parquet",
        output_folder=str(tmp_path / "out"),
        output_format="webdataset",
        save_additional_columns=["license", "score"],
        extract_exif=False,
        compute_hash="md5",
        **FAST,
    )
    (row,) = rows(tmp_path / "out")
    assert list(row) == [
        *("license", "score", "url", "key", "status", "error_message"),
        *("width", "height", "original_width", "original_height", "md5"),
    ]
    assert (row["license"], row["score"]) == ("cc-by", 0.5)
    with tarfile.open(tmp_path / "out" / "00000.tar") as tar:
        assert tar.getnames() == ["000000000.jpg", "000000000.json"]
        assert json.loads(tar.extractfile("000000000.json").read())["license"] == "cc-by"  # type: ignore[union-attr]


def test_bad_input_is_reported_before_anything_is_written(tmp_path: Path) -> None:
    url_list = write_url_file(tmp_path / "urls.csv", ["http://127.0.0.1:9/a.jpg"])
    with pytest.raises(InputTableError, match="missing column"):
        download(
            url_list=str(url_list), input_format="csv", caption_col="text", output_folder=str(tmp_path / "o1")
        )
    with pytest.raises(ConfigError, match=r"^resize_mode"):
        download(
            url_list=str(url_list), input_format="csv", resize_mode="fit", output_folder=str(tmp_path / "o2")
        )
    assert not (tmp_path / "o2").exists()


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "img2ds_dagster.cli", *args]
    return subprocess.run(
        command, check=False, cwd=cwd, capture_output=True, text=True, timeout=120, env=os.environ.copy()
    )


def test_cli_takes_img2datasets_flags(server: ImageServer, tmp_path: Path) -> None:
    write_url_file(tmp_path / "urls.txt", [server.url("/robots/noai.jpg"), server.url("/gen/300x100.jpg")])
    result = run_cli(
        "download",
        "--url_list=urls.txt",
        "--output_folder=out",
        "--output_format",
        "webdataset",
        "--disallowed_header_directives=[]",
        "--resize_mode=keep_ratio",
        "--image_size=64",
        "--resize_only_if_bigger",
        "--thread_count=4",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "2 of 2 images in 1 shards" in result.stdout
    got = rows(tmp_path / "out")
    assert [r["status"] for r in got] == ["success", "success"]  # the opt-out header was ignored
    assert (got[1]["width"], got[1]["height"]) == (192, 64)


def test_cli_reports_bad_options(tmp_path: Path) -> None:
    (tmp_path / "urls.txt").write_text("http://127.0.0.1:9/a.jpg\n")
    bad = run_cli("download", "--url_list=urls.txt", "--encode_format=gif", cwd=tmp_path)
    assert bad.returncode == 2
    assert "encode_format: must be one of" in bad.stderr
    wandb = run_cli("download", "--url_list=urls.txt", "--enable_wandb=True", cwd=tmp_path)
    assert wandb.returncode == 2
    assert "enable_wandb: img2ds_dagster reports to Dagster" in wandb.stderr
    typo = run_cli("download", "--url_list=urls.txt", "--image_sise=3", cwd=tmp_path)
    assert typo.returncode == 2
    assert "unknown option --image_sise (did you mean --image_size?)" in typo.stderr


def test_extend_gives_clashing_tables_fresh_names() -> None:
    assert fresh_names(["a", "b"], set()) == ["a", "b"]
    assert fresh_names(["a", "b"], {"a"}) == ["a-2", "b"]
    assert fresh_names(["a", "a-2"], {"a", "a-3"}) == ["a-4", "a-2"]
    assert fresh_names(["a-2", "a"], {"a", "a-2"}) == ["a-2-2", "a-3"]
