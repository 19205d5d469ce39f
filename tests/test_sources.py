"""Reading URL files in every input format, validating them, and staging them as shards."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import write_url_file

from img2ds_dagster.engine import sources
from img2ds_dagster.engine.settings import DownloadSettings
from img2ds_dagster.engine.sources import (
    INPUT_FORMATS,
    Staging,
    TableManifest,
    input_fingerprint,
    input_format_of,
    list_input_files,
    read_table,
    table_key,
)
from img2ds_dagster.errors import InputTableError, StagingMissingError

URLS = [f"http://127.0.0.1:9/{i}.jpg" for i in range(7)]
CAPTIONS = [f"caption {i}" for i in range(7)]


def settings(**flags: object) -> DownloadSettings:
    return DownloadSettings.from_flags(**flags)


@pytest.mark.parametrize("fmt", INPUT_FORMATS)
def test_every_input_format_reads_the_same_rows(tmp_path: Path, fmt: str) -> None:
    with_captions = not fmt.startswith("txt")
    path = write_url_file(tmp_path / f"urls.{fmt}", URLS, captions=CAPTIONS if with_captions else None)
    table = read_table(str(path), settings(caption_col="caption" if with_captions else None))
    assert table.column("url").to_pylist() == URLS
    if with_captions:
        assert table.column_names == ["caption", "url"]
        assert table.column("caption").to_pylist() == CAPTIONS


def test_columns_are_renamed_and_ordered_like_img2dataset(tmp_path: Path) -> None:
    path = write_url_file(
        tmp_path / "urls.parquet",
        URLS,
        captions=CAPTIONS,
        extra={"width_hint": list(range(7)), "license": ["cc0"] * 7, "ignored": [0] * 7},
        url_col="URL",
        caption_col="TEXT",
    )
    table = read_table(
        str(path),
        settings(url_col="URL", caption_col="TEXT", save_additional_columns=["license", "width_hint"]),
    )
    assert table.column_names == ["license", "width_hint", "caption", "url"]


def test_txt_keeps_urls_with_commas_and_skips_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "urls.txt"
    path.write_text("http://a/x,y.jpg\n\nhttp://b/z.jpg\r\n")
    assert read_table(str(path), settings()).column("url").to_pylist() == [
        "http://a/x,y.jpg",
        "http://b/z.jpg",
    ]


def test_missing_column_names_the_file_and_the_column(tmp_path: Path) -> None:
    path = write_url_file(tmp_path / "urls.csv", URLS, captions=CAPTIONS)
    with pytest.raises(InputTableError) as err:
        read_table(str(path), settings(caption_col="text"))
    assert str(path) in str(err.value)
    assert "missing column(s) ['text']" in str(err.value)
    assert "['url', 'caption']" in str(err.value)


def test_a_malformed_row_names_the_file_and_the_row(tmp_path: Path) -> None:
    path = tmp_path / "urls.csv"
    path.write_text("url,caption\nhttp://a/1.jpg,one\nhttp://a/2.jpg,two,three\n")
    with pytest.raises(InputTableError) as err:
        read_table(str(path), settings())
    assert str(path) in str(err.value)
    assert "http://a/2.jpg,two,three" in str(err.value)


def test_a_url_column_of_numbers_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "urls.jsonl"
    path.write_text('{"url": 1}\n{"url": 2}\n')
    with pytest.raises(InputTableError, match="the url column holds int64 values, not URLs"):
        read_table(str(path), settings())


def test_unsupported_and_unknown_formats(tmp_path: Path) -> None:
    path = tmp_path / "urls.xlsx"
    path.write_bytes(b"PK")
    with pytest.raises(InputTableError, match="unknown input format"):
        read_table(str(path), settings())
    with pytest.raises(InputTableError, match="unsupported input_format 'xml'"):
        read_table(str(path), settings(input_format="xml"))


def test_corrupt_gzip_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "urls.csv.gz"
    path.write_bytes(gzip.compress(b"url\nhttp://a/1.jpg\n")[:-12])
    with pytest.raises(InputTableError, match=str(path)):
        read_table(str(path), settings())


def test_json_accepts_records_and_columns(tmp_path: Path) -> None:
    records = tmp_path / "records.json"
    records.write_text(json.dumps([{"url": u} for u in URLS]))
    columns = tmp_path / "columns.json"
    columns.write_text(json.dumps({"url": {str(i): u for i, u in enumerate(URLS)}}))
    for path in (records, columns):
        assert read_table(str(path), settings()).column("url").to_pylist() == URLS


@pytest.mark.parametrize(
    ("name", "fmt", "key"),
    [
        ("laion_part1.parquet", "parquet", "laion_part1"),
        ("cc 3m (train).tsv.gz", "tsv.gz", "cc_3m_train"),
        ("s3://bucket/drops/urls.v2.jsonl", "jsonl", "urls.v2"),
        ("notes.md", None, "notes"),
    ],
)
def test_format_and_table_key_from_the_file_name(name: str, fmt: str | None, key: str) -> None:
    assert input_format_of(name) == fmt
    assert table_key(name) == key


def test_a_folder_lists_its_files_of_the_format(tmp_path: Path) -> None:
    for name in ("b.csv", "a.csv", "c.txt"):
        write_url_file(tmp_path / name, URLS[:1])
    assert [Path(p).name for p in list_input_files(str(tmp_path), "csv")] == ["a.csv", "b.csv"]
    with pytest.raises(InputTableError, match=r"no \*\.parquet file"):
        list_input_files(str(tmp_path), "parquet")
    with pytest.raises(InputTableError, match="no such file or folder"):
        list_input_files(str(tmp_path / "missing.csv"), "csv")


def test_staging_cuts_shards_and_writes_the_manifest_last(tmp_path: Path) -> None:
    path = write_url_file(tmp_path / "t.csv", URLS, captions=CAPTIONS)
    staging = Staging(str(tmp_path / "staging"))
    manifest = staging.stage(
        "t", str(path), settings(caption_col="caption", number_sample_per_shard=3), str(tmp_path / "out"), 10
    )
    assert (manifest.row_count, manifest.shard_count, list(manifest.shard_ids)) == (7, 3, [10, 11, 12])
    assert staging.tables() == ["t"]
    assert staging.manifest("t") == manifest
    rows = [
        pq.read_table(staging.shard_path("t", manifest.shard_name(i))).num_rows for i in manifest.shard_ids
    ]
    assert rows == [3, 3, 1]
    assert staging.shard_rows("t", "00012").column("url").to_pylist() == URLS[6:]
    with pytest.raises(StagingMissingError, match="re-materialize url_tables"):
        staging.shard_rows("t", "00013")
    with pytest.raises(StagingMissingError, match="materialize url_tables\\[other\\] first"):
        staging.manifest("other")


def test_an_empty_file_stages_no_shard(tmp_path: Path) -> None:
    path = tmp_path / "empty.txt"
    path.write_text("")
    manifest = Staging(str(tmp_path / "staging")).stage("empty", str(path), settings(), str(tmp_path / "out"))
    assert (manifest.row_count, manifest.shard_count) == (0, 0)


def test_each_shard_is_fingerprinted_by_its_rows(tmp_path: Path) -> None:
    staging = Staging(str(tmp_path / "staging"))

    def stage(fmt: str, urls: list[str], captions: list[str]) -> TableManifest:
        path = write_url_file(tmp_path / f"t.{fmt}", urls, captions=captions)
        flags = settings(caption_col="caption", number_sample_per_shard=3)
        return staging.stage("t", str(path), flags, str(tmp_path / "out"))

    first = stage("csv", URLS, CAPTIONS)
    assert len(first.fingerprints) == first.shard_count == 3
    assert len(set(first.fingerprints)) == 3
    # A shard's fingerprint is its rows', not the slice's: the staged file read back gives it too.
    assert [input_fingerprint(staging.shard_rows("t", first.shard_name(i))) for i in first.shard_ids] == (
        first.fingerprints
    )
    assert staging.manifest("t").fingerprints == first.fingerprints
    # The same rows from another format; then one caption edited; then one row appended.
    assert stage("parquet", URLS, CAPTIONS).fingerprints == first.fingerprints
    edited = stage("csv", URLS, [*CAPTIONS[:4], "edited", *CAPTIONS[5:]]).fingerprints
    assert [a == b for a, b in zip(edited, first.fingerprints, strict=True)] == [True, False, True]
    grown = stage("csv", [*URLS, "http://127.0.0.1:9/7.jpg"], [*CAPTIONS, "caption 7"]).fingerprints
    assert [a == b for a, b in zip(grown, first.fingerprints, strict=True)] == [True, True, False]
    assert (first.fingerprint(0), first.fingerprint(3)) == (first.fingerprints[0], None)


def test_a_manifest_staged_without_fingerprints_still_reads(tmp_path: Path) -> None:
    path = write_url_file(tmp_path / "t.txt", URLS)
    manifest = Staging(str(tmp_path / "staging")).stage("t", str(path), settings(), str(tmp_path / "out"))
    data = manifest.to_dict()
    del data["fingerprints"]
    older = TableManifest.from_dict(data)
    assert (older.fingerprints, older.fingerprint(0)) == ([], None)


@pytest.mark.parametrize("fmt", ["txt", "csv", "tsv.gz", "jsonl", "json", "parquet"])
def test_staging_by_batches_cuts_the_same_shards_as_a_whole_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    """Batches of 7 rows (CSV and JSON blocks of 256 bytes) and shards of 5: shards span batches."""
    monkeypatch.setattr(sources, "BATCH_ROWS", 7)
    monkeypatch.setattr(sources, "_BLOCK_BYTES", 256)
    urls = [f"http://example.com/{i}.jpg" for i in range(103)]
    path = write_url_file(tmp_path / f"t.{fmt}", urls, captions=[f"caption {i}" for i in range(103)])
    flags = settings(caption_col=None if fmt == "txt" else "caption", number_sample_per_shard=5)
    staging = Staging(str(tmp_path / "staging"))
    manifest = staging.stage("t", str(path), flags, str(tmp_path / "out"))
    if fmt != "json":  # a JSON array is one batch; the others are read many batches at a time
        assert len(list(sources.read_batches(str(path), flags))) > 2
    whole = sources.read_table(str(path), flags)
    expected = [sources.input_fingerprint(whole.slice(i, 5)) for i in range(0, 103, 5)]
    assert (manifest.row_count, manifest.shard_count, manifest.fingerprints) == (103, 21, expected)
    assert manifest.columns == whole.column_names
    shard = staging.shard_rows("t", manifest.shard_name(20))
    assert shard.column("url").to_pylist() == urls[100:]


def test_a_column_whose_type_changes_further_down_is_read_again_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # pyarrow's CSV reader fixes each column's type from its first block: "rank" reads as numbers
    # there, and the text further down cannot be converted. The file is then read whole.
    monkeypatch.setattr(sources, "_BLOCK_BYTES", 256)
    lines = ["url,rank"] + [f"http://example.com/{i}.jpg,{i}" for i in range(50)] + ["http://x/a.jpg,top"]
    path = tmp_path / "t.csv"
    path.write_text("\n".join(lines) + "\n")
    flags = settings(save_additional_columns=["rank"], number_sample_per_shard=10)
    manifest = Staging(str(tmp_path / "staging")).stage("t", str(path), flags, str(tmp_path / "out"))
    assert (manifest.row_count, manifest.shard_count) == (51, 6)
    rows = Staging(str(tmp_path / "staging")).shard_rows("t", manifest.shard_name(5)).to_pylist()
    assert rows == [{"url": "http://x/a.jpg", "rank": "top"}]
    assert "read again whole" in caplog.text
