"""``img2ds stage`` from the shell, then ``dagster asset materialize`` of the table, a shard and the
stats, each in a fresh process on the same instance, as a user would type them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import write_url_file
from imageserver import ImageServer

ROOT = Path(__file__).parents[1]
BIN = Path(sys.executable).parent


def shell(tmp_path: Path, *command: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "DAGSTER_HOME": str(ROOT),
        "IMG2DS_DAGSTER_STORAGE": str(tmp_path / "dagster"),
        "IMG2DS_INBOX": str(tmp_path / "inbox"),
        "IMG2DS_STAGING": str(tmp_path / "staging"),
        "IMG2DS_DATASETS": str(tmp_path / "datasets"),
    }
    return subprocess.run(
        [str(BIN / command[0]), *command[1:]],
        check=False,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_stage_then_dagster_asset_materialize(server: ImageServer, tmp_path: Path) -> None:
    # A file nowhere near the inbox, with its own settings file beside it.
    urls = [server.url("/gen/640x480.jpg"), server.url("/gen/320x240.png"), server.url("/status/404")]
    path = write_url_file(tmp_path / "lists" / "fresh.csv", urls, captions=["a", "b", "c"])
    (tmp_path / "lists" / "fresh.img2ds.toml").write_text(
        'caption_col = "caption"\nnumber_sample_per_shard = 2\n'
    )
    staged = shell(tmp_path, "img2ds", "stage", str(path))
    assert staged.returncode == 0, staged.stderr
    assert "url_tables[fresh]: 3 rows in 2 shards (fresh/00000 .. fresh/00001)" in staged.stdout
    materialize = ("dagster", "asset", "materialize", "-m", "img2ds_dagster.definitions", "--select")
    for selection, partition in (
        ("url_tables", "fresh"),
        ("shards", "fresh/00001"),
        ("shards", "fresh/00000"),
    ):
        run = shell(tmp_path, *materialize, selection, "--partition", partition)
        assert run.returncode == 0, run.stderr[-3000:]
    stats = shell(tmp_path, *materialize, "download_stats")
    assert stats.returncode == 0, stats.stderr[-3000:]
    totals = json.loads((tmp_path / "datasets" / "download_stats.json").read_text())["totals"]
    assert (totals["count"], totals["successes"], totals["shards"]) == (3, 2, 2)
    # --name, --no-stage, and errors in one line.
    named = shell(tmp_path, "img2ds", "stage", str(path), "--name", "other", "--no-stage")
    assert named.stdout.strip() == f"url_tables[other]: registered ({path})"
    bad = write_url_file(tmp_path / "lists" / "bad.csv", urls)
    (tmp_path / "lists" / "bad.img2ds.toml").write_text('caption_col = "caption"\n')
    refused = shell(tmp_path, "img2ds", "stage", str(bad))
    assert refused.returncode == 2
    assert refused.stderr.strip().count("\n") == 0
    assert "bad.csv: missing column(s) ['caption']" in refused.stderr


def test_the_shell_says_what_is_wrong_in_a_line(server: ImageServer, tmp_path: Path) -> None:
    """A user's mistake (a missing column, a misspelt flag) is one line on stderr, no traceback."""
    url_file = write_url_file(tmp_path / "links.csv", [server.url("/gen/64x64.jpg")], url_col="link")
    out = tmp_path / "out"
    missing = shell(
        tmp_path, "img2ds", "download", "--url_list", str(url_file), "--input_format", "csv",
        "--output_folder", str(out),
    )  # fmt: skip
    assert missing.returncode == 2
    assert len(missing.stderr.strip().splitlines()) <= 3, missing.stderr
    assert "missing column(s) ['url']; the file has ['link']" in missing.stderr
    assert "Traceback" not in missing.stderr
    typo = shell(tmp_path, "img2ds", "download", "--url_list", str(url_file), "--image_sise", "64")
    assert typo.returncode == 2
    assert typo.stderr.strip().splitlines() == [
        "img2ds download: unknown option --image_sise (did you mean --image_size?) "
        "(img2ds download --help lists the options)"
    ]
    verbose = shell(
        tmp_path, "img2ds", "download", "--url_list", str(url_file), "--input_format", "csv",
        "--output_folder", str(out), "--verbose",
    )  # fmt: skip
    assert "Traceback" in verbose.stderr


def test_a_file_left_at_the_default_format_is_read_as_its_name_says(
    server: ImageServer, tmp_path: Path
) -> None:
    """img2dataset would read a .csv as txt (header and rows as URLs); we read it as csv, and say so."""
    url_file = write_url_file(tmp_path / "list.csv", [server.url("/gen/64x64.jpg")], captions=["a cat"])
    run = shell(
        tmp_path, "img2ds", "download", "--url_list", str(url_file), "--output_folder", str(tmp_path / "o")
    )
    assert run.returncode == 0, run.stderr
    assert "1 of 1 images" in run.stdout
    assert f"{url_file}: read as csv, as its name says (input_format was left at txt)" in run.stderr
    # A format the content contradicts is refused, naming both.
    parquet = write_url_file(tmp_path / "list.parquet", [server.url("/gen/64x64.jpg")])
    wrong = shell(
        tmp_path, "img2ds", "download", "--url_list", str(parquet), "--input_format", "csv",
        "--output_folder", str(tmp_path / "o2"),
    )  # fmt: skip
    assert wrong.returncode == 2
    assert f"{parquet}: input_format is 'csv', but the file is a parquet file" in wrong.stderr


def test_img2ds_download_shows_its_progress(server: ImageServer, tmp_path: Path) -> None:
    """Not on a terminal: a line per shard, with the shards done of how many, images, rate, time left."""
    urls = [server.url("/gen/64x64.jpg"), server.url("/status/404")] * 3
    url_file = write_url_file(tmp_path / "list.txt", urls)
    run = shell(
        tmp_path, "img2ds", "download", "--url_list", str(url_file), "--output_folder", str(tmp_path / "o"),
        "--number_sample_per_shard", "2",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    lines = [line for line in run.stderr.splitlines() if " shards, " in line]
    assert len(lines) == 3
    assert re.fullmatch(
        r"list/0000\d: 1 of 3 shards, 2 images \(50\.0% ok\), [\d,]+ images/s, about .+ left", lines[0]
    )
    assert re.fullmatch(r"list/0000\d: 3 of 3 shards, 6 images \(50\.0% ok\), [\d,]+ images/s", lines[-1])
