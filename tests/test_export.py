"""The bucketed export (bucketed_shards_v1): read back with the webdataset package against its
manifest, duplicates by source bytes, determinism, re-exports after more shards, refusals, the shell
command, and the Dagster asset with its sensor."""

from __future__ import annotations

import gc
import glob
import json
import os
import tarfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import fsspec
import pytest
import webdataset as wds
from conftest import write_url_file
from imageserver import ImageServer
from s3server import S3Server

from img2ds_dagster import download, export_buckets
from img2ds_dagster.cli import main
from img2ds_dagster.definitions import defs
from img2ds_dagster.defs.export import bucketed_dataset, bucketed_dataset_sensor
from img2ds_dagster.defs.resources import StorageResource, WorkersResource
from img2ds_dagster.defs.shards import shards
from img2ds_dagster.defs.stats import download_stats
from img2ds_dagster.defs.url_tables import url_tables
from img2ds_dagster.engine.export import EXPORT_FORMAT
from img2ds_dagster.errors import ExportError

# Sizes of every aspect ratio from 4:1 to 1:4, each large enough for its bucket; two too small for
# theirs (refused, not upsampled).
SIZES = [
    (1400, 1400), (1600, 1200), (1200, 1600), (1800, 1200), (1200, 1800), (2400, 1350), (1350, 2400),
    (2400, 1200), (1200, 2400), (3000, 1000), (1000, 3000), (3200, 800), (800, 3200), (1100, 1000),
    (300, 300), (500, 200),
]  # fmt: skip
TOO_SMALL = 2


def bucket_urls(server: ImageServer) -> list[str]:
    urls = [server.url(f"/gen/{w}x{h}.jpg") for w, h in SIZES]
    # The same bytes at two more URLs: the export keeps the first only.
    urls += [urls[1] + "?copy=1", urls[4] + "?copy=2"]
    urls += [server.url("/status/404"), server.url("/status/500")]
    return urls


@pytest.fixture
def downloaded(server: ImageServer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bucket-mode download of SIZES and two copies, 4 rows per shard."""
    root = tmp_path_factory.mktemp("bucket-download")
    urls = bucket_urls(server)
    captions = [f"caption {i}" if i % 3 else "" for i in range(len(urls))]
    url_file = write_url_file(root / "urls.parquet", urls, captions=captions)
    out = root / "out"
    download(
        str(url_file),
        output_folder=str(out),
        input_format="parquet",
        caption_col="caption",
        output_format="webdataset",
        resize_mode="bucket",
        number_sample_per_shard=4,
        timeout=5,
        retries=0,
    )
    return out


def tars_of(dest: Path) -> list[str]:
    return sorted(glob.glob(str(dest / "buckets" / "*" / "shard-*.tar")))


def read_back(tars: list[str]) -> list[tuple[str, Any, str, dict[str, Any]]]:
    """The export as a training loader reads it, with the webdataset package (its card's loader)."""
    pipeline = (
        wds.WebDataset(tars, shardshuffle=False).decode("pil").to_tuple("__key__", "jpg", "txt", "json")
    )
    samples = list(pipeline)
    gc.collect()  # webdataset 1.0 leaves its tar files to the garbage collector: closed here
    return samples


# webdataset 1.0 does not close the tar files it reads (read_back collects them at once).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_the_export_reads_back_with_webdataset_as_its_manifest_says(
    server: ImageServer, downloaded: Path, tmp_path: Path
) -> None:
    dest = tmp_path / "export"
    report = export_buckets(str(downloaded), str(dest), samples_per_tar=2)
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest == report.manifest
    assert manifest["format"] == EXPORT_FORMAT
    totals = manifest["totals"]
    kept = len(SIZES) - TOO_SMALL
    assert totals["source_successes"] == kept + 2  # the two copies downloaded fine
    assert (totals["samples"], totals["duplicates_removed"]) == (kept, 2)
    assert totals["source_rows"] == len(bucket_urls(server))

    samples = read_back(tars_of(dest))
    assert len(samples) == totals["samples"]
    per_bucket = Counter(meta["bucket_id"] for _, _, _, meta in samples)
    assert per_bucket == {b["bucket_id"]: b["count"] for b in manifest["buckets"]}
    listed = sorted(str(dest / t["name"]) for b in manifest["buckets"] for t in b["shards"])
    assert listed == tars_of(dest)
    for bucket in manifest["buckets"]:
        for entry in bucket["shards"]:
            with tarfile.open(dest / entry["name"]) as tar:
                assert len(tar.getnames()) == 3 * entry["samples"] <= 3 * 2
            assert entry["name"].startswith(f"buckets/{bucket['bucket_id']}/shard-")
    urls = [meta["url"] for _, _, _, meta in samples]
    assert len(set(urls)) == len(urls)
    assert not [u for u in urls if "copy=" in u]
    for key, image, caption, meta in samples:
        assert image.size == (meta["target_width"], meta["target_height"]) == (meta["width"], meta["height"])
        assert image.width % 32 == 0
        assert image.height % 32 == 0
        assert image.width <= meta["original_width"]
        assert image.height <= meta["original_height"]
        assert image.mode == "RGB"
        assert caption == (meta["caption"] or "")
        assert key == meta["key"]
        assert meta["source_shard"] == key[:5]
    captioned = sum(1 for _, _, caption, _ in samples if caption)
    assert totals["captioned"] == captioned
    assert totals["caption_coverage"] == round(captioned / totals["samples"], 6)
    assert manifest["settings"]["images"]["bucket_base"] == 512
    assert manifest["sources"][0]["input_fingerprint"]


def test_the_export_is_deterministic_and_a_rerun_changes_nothing(downloaded: Path, tmp_path: Path) -> None:
    first = export_buckets(str(downloaded), str(tmp_path / "a"), samples_per_tar=3)
    export_buckets(str(downloaded), str(tmp_path / "b"), samples_per_tar=3)
    names = [os.path.relpath(p, tmp_path / "a") for p in tars_of(tmp_path / "a")]
    assert names == [os.path.relpath(p, tmp_path / "b") for p in tars_of(tmp_path / "b")]
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    again = export_buckets(str(downloaded), str(tmp_path / "a"), samples_per_tar=3)
    assert (again.tars_written, again.tars_kept) == (0, first.manifest["totals"]["tars"])
    assert again.manifest["export_id"] == first.manifest["export_id"]
    other = export_buckets(str(downloaded), str(tmp_path / "a"), samples_per_tar=2)
    assert other.rewrote_all == "the export settings changed"
    assert other.tars_kept == 0


def test_a_reexport_after_more_shards_matches_a_fresh_export(downloaded: Path, tmp_path: Path) -> None:
    """Shards that were not finished at the first export (no stats file yet) are added by the next,
    which rewrites only the tars whose samples changed and ends equal to an export made at once."""
    hidden = {}
    for name in ("00001", "00004"):
        stats = downloaded / f"{name}_stats.json"
        hidden[stats] = stats.read_bytes()
        stats.unlink()
    dest = tmp_path / "export"
    partial = export_buckets(str(downloaded), str(dest), samples_per_tar=1)
    shards_seen = {json.loads(m)["source_shard"] for m in _members(dest, ".json")}
    assert "00001" not in shards_seen
    assert "00004" not in shards_seen
    for path, data in hidden.items():
        path.write_bytes(data)
    full = export_buckets(str(downloaded), str(dest), samples_per_tar=1)
    fresh = export_buckets(str(downloaded), str(tmp_path / "fresh"), samples_per_tar=1)
    assert full.manifest["totals"] == fresh.manifest["totals"]
    assert full.manifest["buckets"] == fresh.manifest["buckets"]
    assert [os.path.relpath(p, dest) for p in tars_of(dest)] == [
        os.path.relpath(p, tmp_path / "fresh") for p in tars_of(tmp_path / "fresh")
    ]
    for path in tars_of(dest):
        assert Path(path).read_bytes() == (tmp_path / "fresh" / os.path.relpath(path, dest)).read_bytes()
    # One sample per tar: the tars before the new samples in their bucket were kept.
    assert full.tars_kept > 0
    assert full.tars_written > 0
    assert full.rewrote_all is None
    assert full.tars_kept + full.tars_written == full.manifest["totals"]["tars"]
    assert partial.manifest["totals"]["samples"] < full.manifest["totals"]["samples"]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".export")]  # no leftovers


def _members(dest: Path, suffix: str) -> Iterator[bytes]:
    for path in tars_of(dest):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                if member.name.endswith(suffix):
                    yield tar.extractfile(member).read()  # type: ignore[union-attr]


def test_without_dedup_the_copies_stay(downloaded: Path, tmp_path: Path) -> None:
    report = export_buckets(str(downloaded), str(tmp_path / "export"), dedup=False)
    assert report.manifest["totals"]["duplicates_removed"] == 0
    assert report.manifest["totals"]["samples"] == len(SIZES) - TOO_SMALL + 2


def test_shards_not_built_in_bucket_mode_are_refused(server: ImageServer, tmp_path: Path) -> None:
    urls = write_url_file(tmp_path / "urls.txt", [server.url("/gen/800x600.jpg")])
    download(str(urls), output_folder=str(tmp_path / "out"), output_format="webdataset")
    with pytest.raises(
        ExportError, match=r"table urls: built with resize_mode='border'.*resize_mode='bucket'"
    ):
        export_buckets(str(tmp_path / "out"), str(tmp_path / "export"))
    with pytest.raises(ExportError, match="no finished shard"):
        export_buckets(str(tmp_path / "nothing"), str(tmp_path / "export"))
    assert not (tmp_path / "export").exists()


def test_img2ds_export_buckets_from_the_shell(
    downloaded: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dest = tmp_path / "export"
    assert main(["export-buckets", str(downloaded), str(dest), "--samples_per_tar", "5"]) == 0
    out = capsys.readouterr().out
    totals = json.loads((dest / "manifest.json").read_text())["totals"]
    assert f"{totals['samples']} samples in {totals['buckets']} buckets" in out
    assert "2 duplicates removed" in out
    assert main(["export-buckets", str(downloaded), str(downloaded)]) == 2
    assert "is the output folder itself" in capsys.readouterr().err


def test_an_export_from_the_files_format_equals_one_from_tars(server: ImageServer, tmp_path: Path) -> None:
    urls = write_url_file(tmp_path / "urls.txt", [server.url(f"/gen/{w}x{h}.jpg") for w, h in SIZES[:6]])
    for fmt in ("files", "webdataset", "parquet"):
        download(
            str(urls), output_folder=str(tmp_path / fmt), output_format=fmt, resize_mode="bucket", timeout=5
        )
        export_buckets(str(tmp_path / fmt), str(tmp_path / f"export-{fmt}"))
    for fmt in ("files", "parquet"):
        ours, theirs = tars_of(tmp_path / f"export-{fmt}"), tars_of(tmp_path / "export-webdataset")
        assert len(ours) == len(theirs) > 0
        for a, b in zip(ours, theirs, strict=True):
            assert _images_in(a) == _images_in(b)


def _images_in(path: str) -> list[bytes]:
    with tarfile.open(path) as tar:
        return [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")]  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    s3fs_class = fsspec.get_filesystem_class("s3")
    with S3Server() as server, pytest.MonkeyPatch.context() as env:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
            env.delenv(name, raising=False)
        for name, value in server.environ().items():
            env.setenv(name, value)
        s3fs_class.clear_instance_cache()
        fsspec.filesystem("s3").mkdir("export-test")
        yield server
        s3fs_class.clear_instance_cache()


def test_an_export_to_an_object_store_equals_a_local_one(
    s3: S3Server, downloaded: Path, tmp_path: Path
) -> None:
    """Changed tars uploaded, then the manifest, then the tars the export no longer has deleted."""
    fs = fsspec.filesystem("s3")
    dest = "s3://export-test/bucketed"
    stats = downloaded / "00000_stats.json"
    kept = stats.read_bytes()
    stats.unlink()
    export_buckets(str(downloaded), dest, samples_per_tar=1)
    stats.write_bytes(kept)
    for samples_per_tar in (1, 5):  # one more shard; then other settings: fewer tars
        report = export_buckets(str(downloaded), dest, samples_per_tar=samples_per_tar)
        folder = tmp_path / f"local{samples_per_tar}"
        local = export_buckets(str(downloaded), str(folder), samples_per_tar)
        found = sorted(f.removeprefix("export-test/bucketed/") for f in fs.find("export-test/bucketed"))
        names = [os.path.relpath(p, folder) for p in tars_of(folder)]
        assert found == sorted([*names, "manifest.json"])
        for name in names:
            assert fs.cat_file(f"export-test/bucketed/{name}") == (folder / name).read_bytes()
        manifest = json.loads(fs.cat_file("export-test/bucketed/manifest.json"))
        assert manifest["buckets"] == local.manifest["buckets"] == report.manifest["buckets"]
    assert report.rewrote_all == "the export settings changed"


# The Dagster asset.

ASSETS = [url_tables, shards, download_stats, bucketed_dataset]


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


def _stage_and_build(
    instance: dg.DagsterInstance, resources: dict[str, Any], table: str, **config: Any
) -> list[str]:
    instance.add_dynamic_partitions("url_tables", [table])
    staged = dg.materialize(
        ASSETS,
        selection=[url_tables],
        partition_key=table,
        instance=instance,
        resources=resources,
        run_config={"ops": {"url_tables": {"config": config}}},
    )
    assert staged.success
    keys = [k for k in instance.get_dynamic_partitions("shards") if k.startswith(f"{table}/")]
    for key in keys:
        assert dg.materialize(
            ASSETS, selection=[shards], partition_key=key, instance=instance, resources=resources
        ).success
    return keys


def _export(
    instance: dg.DagsterInstance, resources: dict[str, Any], table: str, **config: Any
) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        ASSETS,
        selection=[bucketed_dataset],
        partition_key=table,
        instance=instance,
        resources=resources,
        run_config={"ops": {"bucketed_dataset": {"config": config}}},
        raise_on_error=False,
    )


def test_the_bucketed_dataset_asset_exports_a_table_with_lineage(
    server: ImageServer, tmp_path: Path, resources: dict[str, Any]
) -> None:
    urls = bucket_urls(server)
    write_url_file(tmp_path / "inbox" / "first.txt", urls[:8])
    write_url_file(tmp_path / "inbox" / "second.txt", [urls[1], *urls[8:12]])  # urls[1] again
    with dg.instance_for_test() as instance:
        for table in ("first", "second"):
            _stage_and_build(
                instance, resources, table, resize_mode="bucket", number_sample_per_shard=3, timeout=5
            )
        result = _export(instance, resources, "second", samples_per_tar=2)
        assert result.success
        (event,) = result.asset_materializations_for_node("bucketed_dataset")
        meta = {k: v.value for k, v in event.metadata.items()}
        manifest = json.loads((tmp_path / "datasets" / "bucketed" / "second" / "manifest.json").read_text())
        assert meta["samples"] == manifest["totals"]["samples"] == 5
        assert meta["duplicates_removed"] == 0
        assert meta["rewrote_all"] == "no previous export at the destination"
        rows = event.metadata["buckets"].value.records  # type: ignore[attr-defined]
        assert sum(r.data["samples"] for r in rows) == 5
        assert manifest["sources"][0]["table"] == "second"
        # dedup_scope="all": the sample of urls[1] was the first table's first.
        across = _export(instance, resources, "second", dedup_scope="all", destination=str(tmp_path / "all"))
        (event,) = across.asset_materializations_for_node("bucketed_dataset")
        assert event.metadata["duplicates_removed"].value == 1
        manifest = json.loads((tmp_path / "all" / "manifest.json").read_text())
        assert [s["table"] for s in manifest["dedup_against"]] == ["first"]
        # The lineage edge shards -> bucketed_dataset.
        graph = defs.resolve_asset_graph()
        assert shards.key in graph.get(bucketed_dataset.key).parent_keys


def test_the_asset_refuses_a_table_not_built_in_bucket_mode(
    server: ImageServer, tmp_path: Path, resources: dict[str, Any]
) -> None:
    write_url_file(tmp_path / "inbox" / "plain.txt", [server.url("/gen/800x600.jpg")])
    with dg.instance_for_test() as instance:
        _stage_and_build(instance, resources, "plain", timeout=5)
        result = _export(instance, resources, "plain")
        assert not result.success
        failure = next(e for e in result.all_events if e.is_step_failure)
        message = failure.step_failure_data.error.message  # type: ignore[union-attr]
        assert "table plain: built with resize_mode='border'" in message


def test_the_sensor_refreshes_a_bucket_table_once_its_shards_are_built(
    server: ImageServer, tmp_path: Path, resources: dict[str, Any]
) -> None:
    write_url_file(tmp_path / "inbox" / "b.txt", bucket_urls(server)[:4])
    write_url_file(tmp_path / "inbox" / "plain.txt", [server.url("/gen/800x600.jpg")])
    with dg.instance_for_test() as instance:
        _stage_and_build(instance, resources, "b", resize_mode="bucket", timeout=5)
        _stage_and_build(instance, resources, "plain", timeout=5)
        context = dg.build_sensor_context(instance=instance, resources=resources)
        result = bucketed_dataset_sensor(context)
        assert isinstance(result, dg.SensorResult)
        assert [r.partition_key for r in result.run_requests or []] == ["b"]
        again = bucketed_dataset_sensor(
            dg.build_sensor_context(instance=instance, resources=resources, cursor=result.cursor)
        )
        assert isinstance(again, dg.SensorResult)
        assert not again.run_requests
