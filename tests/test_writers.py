"""Each output format written, then read back; commits are atomic and outputs reproducible."""

from __future__ import annotations

import io
import json
import os
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from img2ds_dagster.engine.settings import OUTPUT_FORMATS, OutputSettings
from img2ds_dagster.engine.storage import StoreFolder
from img2ds_dagster.engine.writers import (
    WRITERS,
    Sample,
    ShardTarget,
    UstarStream,
    metadata_schema,
    open_writer,
)

INPUT = pa.schema([("license", pa.string()), ("caption", pa.string()), ("url", pa.string())])
SCHEMA = metadata_schema(INPUT, OutputSettings())


def samples() -> list[Sample]:
    out = []
    for i in range(4):
        ok = i != 2
        meta = {
            "license": "cc0",
            "caption": f"a photo {i}",
            "url": f"http://host/{i}.jpg",
            "key": f"0000{i}",
            "status": "success" if ok else "failed_to_download",
            "error_message": None if ok else "HTTP Error 404: Not Found",
            "width": 256 if ok else None,
            "height": 256 if ok else None,
            "original_width": 640 if ok else None,
            "original_height": 480 if ok else None,
            "exif": "{}" if ok else None,
            "sha256": "ab" * 32 if ok else None,
        }
        out.append(Sample(f"0000{i}", meta, f"jpeg bytes {i}".encode() if ok else None, meta["caption"]))
    return out


def target(folder: Path, save_caption: bool = True) -> ShardTarget:
    return ShardTarget(str(folder), "00000", metadata_schema(INPUT, OutputSettings()), "jpg", save_caption)


def write(output_format: str, folder: Path, save_caption: bool = True) -> int:
    with open_writer(output_format, target(folder, save_caption)) as writer:
        for sample in samples():
            writer.write(sample)
        return writer.commit()


def test_metadata_schema_is_img2datasets() -> None:
    assert metadata_schema(INPUT, OutputSettings()).names == [
        *("license", "caption", "url", "key", "status", "error_message"),
        *("width", "height", "original_width", "original_height", "exif", "sha256"),
    ]
    no_extras = metadata_schema(INPUT, OutputSettings(extract_exif=False, compute_hash=None))
    assert no_extras.names[-1] == "original_height"


def assert_metadata_parquet(path: Path) -> None:
    table = pq.read_table(path)
    assert table.schema.names == metadata_schema(INPUT, OutputSettings()).names
    assert table.column("key").to_pylist() == ["00000", "00001", "00002", "00003"]
    assert table.column("status").to_pylist() == ["success", "success", "failed_to_download", "success"]
    assert table.schema.field("width").type == pa.int32()


def test_webdataset_round_trip(tmp_path: Path) -> None:
    size = write("webdataset", tmp_path)
    with tarfile.open(tmp_path / "00000.tar") as tar:
        members = tar.getmembers()
        names = [m.name for m in members]
        assert names == [f"0000{i}.{ext}" for i in (0, 1, 3) for ext in ("jpg", "json", "txt")]
        assert {(m.mtime, m.mode, m.uname, m.gname) for m in members} == {(0, 0o444, "bigdata", "bigdata")}
        meta = json.loads(tar.extractfile("00001.json").read())  # type: ignore[union-attr]
        assert list(meta)[:4] == ["license", "caption", "url", "key"]
        assert meta["status"] == "success"
        assert tar.extractfile("00001.jpg").read() == b"jpeg bytes 1"  # type: ignore[union-attr]
        assert tar.extractfile("00003.txt").read() == b"a photo 3"  # type: ignore[union-attr]
    assert_metadata_parquet(tmp_path / "00000.parquet")
    assert size == (tmp_path / "00000.tar").stat().st_size + (tmp_path / "00000.parquet").stat().st_size


def test_webdataset_without_captions_has_no_txt(tmp_path: Path) -> None:
    write("webdataset", tmp_path, save_caption=False)
    with tarfile.open(tmp_path / "00000.tar") as tar:
        assert not [n for n in tar.getnames() if n.endswith(".txt")]


def test_files_round_trip(tmp_path: Path) -> None:
    write("files", tmp_path)
    folder = tmp_path / "00000"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        f"0000{i}.{ext}" for i in (0, 1, 3) for ext in ("jpg", "json", "txt")
    )
    assert (folder / "00000.jpg").read_bytes() == b"jpeg bytes 0"
    assert json.loads((folder / "00003.json").read_text())["key"] == "00003"
    assert_metadata_parquet(tmp_path / "00000.parquet")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_files_rewrite_replaces_the_folder(tmp_path: Path) -> None:
    write("files", tmp_path)
    (tmp_path / "00000" / "stale.jpg").write_bytes(b"old")
    write("files", tmp_path)
    assert not (tmp_path / "00000" / "stale.jpg").exists()


def test_parquet_round_trip(tmp_path: Path) -> None:
    write("parquet", tmp_path)
    table = pq.read_table(tmp_path / "00000.parquet")
    assert table.schema.names == [*metadata_schema(INPUT, OutputSettings()).names, "jpg"]
    assert table.column("jpg").to_pylist() == [b"jpeg bytes 0", b"jpeg bytes 1", None, b"jpeg bytes 3"]


def test_dummy_writes_nothing(tmp_path: Path) -> None:
    assert write("dummy", tmp_path) == 0
    assert list(tmp_path.iterdir()) == []


def fail_half_way(
    output_format: str, shard: ShardTarget, count: int = 1, written: list[Sample] | None = None
) -> None:
    """Write ``written`` (default: the first ``count`` samples()), then fail before the commit."""
    with open_writer(output_format, shard) as writer:
        for sample in samples()[:count] if written is None else written:
            writer.write(sample)
        raise RuntimeError("the shard failed half way")


@pytest.mark.parametrize("output_format", sorted(WRITERS))
def test_a_failed_shard_leaves_no_file(tmp_path: Path, output_format: str) -> None:
    with pytest.raises(RuntimeError, match="half way"):
        fail_half_way(output_format, target(tmp_path))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("output_format", ["webdataset", "parquet"])
def test_same_samples_give_byte_identical_files(tmp_path: Path, output_format: str) -> None:
    write(output_format, tmp_path / "a")
    write(output_format, tmp_path / "b")
    for path in sorted((tmp_path / "a").iterdir()):
        assert path.read_bytes() == (tmp_path / "b" / path.name).read_bytes(), path.name


def test_every_output_format_has_a_writer() -> None:
    assert set(WRITERS) == set(OUTPUT_FORMATS)


def test_tar_stream_is_byte_identical_to_tarfile() -> None:
    members = [("000000000.jpg", b""), ("000000001.json", b"x" * 511), ("000000002.txt", b"y" * 512)]
    members += [("000000003.webp", bytes(range(256)) * 5), ("000000004.jpg", b"z" * 10_000)]
    ours = io.BytesIO()
    stream = UstarStream(ours)
    for name, data in members:
        stream.add(name, data)
    stream.close()
    theirs = io.BytesIO()
    with tarfile.open(fileobj=theirs, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            info.uname = info.gname = "bigdata"
            tar.addfile(info, io.BytesIO(data))
    assert ours.getvalue() == theirs.getvalue()
    assert stream.size == len(ours.getvalue())
    with pytest.raises(ValueError, match="over 100 bytes"):
        stream.add("k" * 101, b"")


@pytest.fixture
def memory_folder() -> Iterator[str]:
    """A folder on fsspec's in-memory filesystem, standing for any object store."""
    fs = fsspec.filesystem("memory")
    root = f"/img2ds-writers-{uuid.uuid4().hex[:8]}"
    yield f"memory://{root}/out"
    if fs.exists(root):
        fs.rm(root, recursive=True)


def listing(folder: str) -> dict[str, bytes]:
    fs, path = fsspec.core.url_to_fs(folder)
    if not fs.exists(path):
        return {}
    return {p.rsplit("/", 1)[1]: fs.cat_file(p) for p in fs.find(path)}


@pytest.mark.parametrize("output_format", sorted(set(WRITERS) - {"dummy"}))
def test_a_failed_shard_leaves_no_object_in_an_object_store(memory_folder: str, output_format: str) -> None:
    with pytest.raises(RuntimeError, match="half way"):
        fail_half_way(output_format, ShardTarget(memory_folder, "00000", SCHEMA, "jpg", True), count=4)
    assert listing(memory_folder) == {}


@pytest.mark.parametrize("output_format", ["webdataset", "tfrecord", "parquet"])
@pytest.mark.parametrize("where", ["local", "object store"])
def test_a_failed_rewrite_keeps_the_previous_shard(
    tmp_path: Path, memory_folder: str, output_format: str, where: str
) -> None:
    folder = str(tmp_path) if where == "local" else memory_folder
    shard = ShardTarget(folder, "00000", SCHEMA, "jpg", True)
    with open_writer(output_format, shard) as writer:
        for sample in samples():
            writer.write(sample)
        writer.commit()
    before = listing(folder)
    assert before

    with pytest.raises(RuntimeError, match="half way"):
        fail_half_way(output_format, shard)
    assert listing(folder) == before


def with_successes(successes: set[int]) -> list[Sample]:
    """samples(), rebuilt so that exactly these indexes succeed, with new image bytes."""
    out = []
    for sample in samples():
        ok = int(sample.key) in successes
        meta = {
            **sample.meta,
            "status": "success" if ok else "failed_to_download",
            "error_message": None if ok else "HTTP Error 404: Not Found",
        }
        image = f"new jpeg bytes {sample.key}".encode() if ok else None
        out.append(Sample(sample.key, meta, image, sample.caption))
    return out


def objects(folder: str) -> dict[str, bytes]:
    """Every object under ``folder``, by its path relative to it."""
    fs, path = fsspec.core.url_to_fs(folder)
    return {p[len(path) + 1 :]: fs.cat_file(p) for p in fs.find(path)}


def sample_files(*indexes: int) -> list[str]:
    return sorted(f"00000/0000{i}.{ext}" for i in indexes for ext in ("jpg", "json", "txt"))


@pytest.fixture(params=[2, StoreFolder.BATCH_OBJECTS], ids=["batches of 2", "one batch"])
def upload_batch(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    """StoreFolder's upload batch size: with 2, a shard's objects go up before it fails."""
    monkeypatch.setattr(StoreFolder, "BATCH_OBJECTS", request.param)
    return int(request.param)


def test_a_files_rewrite_on_an_object_store_deletes_what_the_new_version_lacks(
    memory_folder: str, upload_batch: int
) -> None:
    shard = ShardTarget(memory_folder, "00000", SCHEMA, "jpg", True)
    with open_writer("files", shard) as writer:
        for sample in samples():  # 0, 1 and 3 succeed
            writer.write(sample)
        writer.commit()
    assert sorted(objects(memory_folder)) == ["00000.parquet", *sample_files(0, 1, 3)]

    with open_writer("files", shard) as writer:
        for sample in with_successes({0, 2}):
            writer.write(sample)
        writer.commit()
    after = objects(memory_folder)
    assert sorted(after) == ["00000.parquet", *sample_files(0, 2)]
    assert after["00000/00002.jpg"] == b"new jpeg bytes 00002"
    statuses = pq.read_table(io.BytesIO(after["00000.parquet"])).column("status").to_pylist()
    assert statuses == ["success", "failed_to_download", "success", "failed_to_download"]


def test_a_failed_files_rewrite_on_an_object_store_keeps_the_previous_names(
    memory_folder: str, upload_batch: int
) -> None:
    shard = ShardTarget(memory_folder, "00000", SCHEMA, "jpg", True)
    with open_writer("files", shard) as writer:
        for sample in samples():
            writer.write(sample)
        writer.commit()
    before = objects(memory_folder)

    with pytest.raises(RuntimeError, match="half way"):
        fail_half_way("files", shard, written=with_successes({0, 1, 2, 3}))
    after = objects(memory_folder)
    # Sample 2 failed before: its new files are gone. The others keep their names (the ones written
    # before the failure have their new bytes), and the metadata is the previous version's.
    assert sorted(after) == sorted(before)
    assert after["00000.parquet"] == before["00000.parquet"]


def open_files_in(folder: Path) -> list[str]:
    """The files this process has open in ``folder``, named or not (an unlinked file's link in /proc
    is its former path with " (deleted)")."""
    found = []
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith(f"{folder}/"):
            found.append(target)
    return found


@pytest.mark.parametrize("output_format", ["webdataset", "tfrecord"])
def test_object_store_shards_wait_for_upload_in_the_spool_dir(
    tmp_path: Path, memory_folder: str, output_format: str
) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    shard = ShardTarget(memory_folder, "00000", SCHEMA, "jpg", True, spool_dir=str(spool))
    with open_writer(output_format, shard) as writer:
        for sample in samples():
            writer.write(sample)
        waiting = open_files_in(spool)
        assert listing(memory_folder) == {}
        writer.commit()
    # One file waits for its upload there; it has no name, so a killed process leaves nothing behind.
    assert len(waiting) == 1
    assert list(spool.iterdir()) == []
    assert open_files_in(spool) == []
    assert sorted(listing(memory_folder)) == sorted(
        ["00000.parquet", f"00000.{'tar' if output_format == 'webdataset' else 'tfrecord'}"]
    )

    with pytest.raises(RuntimeError, match="half way"):
        fail_half_way(output_format, shard)
    assert list(spool.iterdir()) == []
