"""img2dataset's own test suite, ported: ``download()`` called the way img2dataset users call it, with
the same options, checked against the same output layout and metadata.

Where img2dataset's tests compare against files of its repository (blur references), these compare
against what the option must do to the pixels instead.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tarfile
import urllib.request
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import GOOD_IMAGES, write_url_file
from imageserver import ImageServer

from img2ds_dagster import download
from img2ds_dagster.engine.sources import INPUT_FORMATS
from img2ds_dagster.engine.tfrecord import read_tfrecord
from img2ds_dagster.errors import ConfigError

FAST: dict[str, Any] = {"thread_count": 8, "timeout": 2}
# Real photos and generated images with their sizes; the captions are what img2dataset's fixtures use.
IMAGES = list(GOOD_IMAGES.items())
CAPTIONS = [f"caption {i}" for i in range(len(IMAGES))]


def urls(server: ImageServer) -> list[str]:
    return [server.url(path) for path, _ in IMAGES]


def fetch(server: ImageServer, path: str) -> bytes:
    with urllib.request.urlopen(server.url(path), timeout=5) as response:
        data: bytes = response.read()
    return data


def files_of(folder: Path, ext: str) -> list[Path]:
    return sorted(p for p in folder.rglob(f"*.{ext}") if ".img2ds" not in p.parts)


def metadata(folder: Path) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for path in sorted(folder.glob("*.parquet")):
        out += pq.read_table(path).to_pylist()
    return out


def expected_size(
    width: int, height: int, image_size: int, mode: str, only_if_bigger: bool
) -> tuple[int, int]:
    """The output size img2dataset gives an image (albumentations' max-size transforms, then pad/crop)."""
    if mode == "no":
        return width, height
    reference = min(width, height) if mode in ("keep_ratio", "center_crop") else max(width, height)
    if only_if_bigger and reference <= image_size:
        return width, height
    scale = image_size / reference
    w, h = max(1, round(width * scale)), max(1, round(height * scale))
    if mode == "border":
        return max(w, image_size), max(h, image_size)
    if mode == "center_crop":
        return image_size, image_size
    return w, h


RESIZE_CASES = [
    ("border", False, False),
    ("border", False, True),
    ("border", True, False),
    ("keep_ratio", False, False),
    ("keep_ratio", True, False),
    ("keep_ratio", True, True),
    ("keep_ratio_largest", False, False),
    ("center_crop", False, False),
    ("center_crop", True, False),
    ("no", False, False),
    ("no", False, True),
]


@pytest.mark.parametrize(("resize_mode", "resize_only_if_bigger", "skip_reencode"), RESIZE_CASES)
def test_download_resize(
    server: ImageServer, tmp_path: Path, resize_mode: str, resize_only_if_bigger: bool, skip_reencode: bool
) -> None:
    url_list = write_url_file(tmp_path / "url_list.txt", urls(server))
    out = tmp_path / "images"
    download(
        str(url_list),
        image_size=256,
        output_folder=str(out),
        resize_mode=resize_mode,
        resize_only_if_bigger=resize_only_if_bigger,
        skip_reencode=skip_reencode,
        **FAST,
    )
    jpgs = files_of(out, "jpg")
    assert len(jpgs) == len(IMAGES)
    assert len([p for p in files_of(out, "json") if "stats" not in p.name]) == len(IMAGES)
    assert len(files_of(out, "parquet")) == 1
    for jpg, (path, (width, height)) in zip(jpgs, IMAGES, strict=True):
        img = cv2.imread(str(jpg), cv2.IMREAD_UNCHANGED)
        expected = expected_size(width, height, 256, resize_mode, resize_only_if_bigger)
        assert (img.shape[1], img.shape[0]) == expected, path
        served = fetch(server, path)
        reference = min(width, height) if resize_mode in ("keep_ratio", "center_crop") else max(width, height)
        not_resized = resize_mode == "no" or (resize_only_if_bigger and reference <= 256)
        untouched = not_resized and served[:2] == b"\xff\xd8"
        # skip_reencode keeps a JPEG's bytes when no resize step runs; otherwise it is re-encoded.
        assert (jpg.read_bytes() == served) == (skip_reencode and untouched), path
    sizes = [(r["original_width"], r["original_height"]) for r in metadata(out)]
    assert sizes == [size for _, size in IMAGES]


# img2dataset's input/output grid, with every input format this project reads.
FORMAT_GRID = [
    *((fmt, out) for fmt in INPUT_FORMATS for out in ("files", "webdataset")),
    ("parquet", "parquet"),
    ("parquet", "dummy"),
    ("parquet", "tfrecord"),
]


@pytest.mark.parametrize(("input_format", "output_format"), FORMAT_GRID)
def test_download_input_format(
    server: ImageServer, tmp_path: Path, input_format: str, output_format: str
) -> None:
    captions = None if input_format.startswith("txt") else CAPTIONS
    url_list = write_url_file(tmp_path / f"url_list.{input_format}", urls(server), captions=captions)
    out = tmp_path / "images"
    download(
        str(url_list),
        image_size=256,
        output_folder=str(out),
        input_format=input_format,
        output_format=output_format,
        url_col="url",
        caption_col="caption" if captions else None,
        compute_hash="md5",
        **FAST,
    )
    count = len(IMAGES)
    if output_format != "dummy":
        columns = pq.read_table(out / "00000.parquet").column_names
        expected = ["url", "key", "status", "error_message", "width", "height"]
        expected += ["original_width", "original_height", "exif", "md5"]
        if captions:
            expected.insert(0, "caption")
        if output_format == "parquet":
            expected.append("jpg")
        assert columns == expected
    if output_format == "files":
        assert len(files_of(out, "jpg")) == count
    elif output_format == "webdataset":
        assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar"]
        with tarfile.open(out / "00000.tar") as tar:
            names = tar.getnames()
        assert len([n for n in names if n.endswith(".jpg")]) == count
        assert len([n for n in names if n.endswith(".txt")]) == (count if captions else 0)
    elif output_format == "parquet":
        assert sorted(p.name for p in out.glob("*.parquet")) == ["00000.parquet"]
        assert pq.read_table(out / "00000.parquet").num_rows == count
    elif output_format == "dummy":
        assert [p.name for p in out.iterdir() if not p.name.startswith(".")] == ["00000_stats.json"]
    elif output_format == "tfrecord":
        assert sorted(p.name for p in out.glob("*.tfrecord")) == ["00000.tfrecord"]
        records = list(read_tfrecord(str(out / "00000.tfrecord")))
        assert len(records) == count
        assert [r["txt"][0].decode() for r in records] == CAPTIONS
        first = cv2.imdecode(np.frombuffer(records[0]["jpg"][0], np.uint8), cv2.IMREAD_UNCHANGED)
        assert first.shape[:2] == (256, 256)


@pytest.mark.parametrize(
    ("input_format", "output_format"),
    [
        ("txt", "files"),
        ("csv", "webdataset"),
        ("tsv.gz", "files"),
        ("json", "webdataset"),
        ("parquet", "files"),
    ],
)
def test_download_multiple_input_files(
    server: ImageServer, tmp_path: Path, input_format: str, output_format: str
) -> None:
    folder = tmp_path / "input_folder"
    captions = None if input_format.startswith("txt") else CAPTIONS
    for name in ("url_list1", "url_list2"):
        write_url_file(folder / f"{name}.{input_format}", urls(server), captions=captions)
    out = tmp_path / "images"
    download(
        str(folder),
        image_size=256,
        output_folder=str(out),
        input_format=input_format,
        output_format=output_format,
        url_col="url",
        caption_col="caption" if captions else None,
        **FAST,
    )
    if output_format == "files":
        assert len(files_of(out, "jpg")) == 2 * len(IMAGES)
        assert sorted(p.name for p in out.iterdir() if p.is_dir() and p.name[0] != ".") == ["00000", "00001"]
    else:
        assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar", "00001.tar"]
        for tar_path in out.glob("*.tar"):
            with tarfile.open(tar_path) as tar:
                assert len([n for n in tar.getnames() if n.endswith(".jpg")]) == len(IMAGES)
    keys = [r["key"] for r in metadata(out)]
    assert (keys[0], keys[len(IMAGES)]) == ("000000000", "000010000")


@pytest.mark.parametrize("save_caption", [True, False])
@pytest.mark.parametrize("output_format", ["files", "webdataset"])
def test_captions_saving(server: ImageServer, tmp_path: Path, save_caption: bool, output_format: str) -> None:
    url_list = write_url_file(tmp_path / "url_list.parquet", urls(server), captions=CAPTIONS)
    out = tmp_path / "images"
    download(
        str(url_list),
        image_size=256,
        output_folder=str(out),
        input_format="parquet",
        output_format=output_format,
        url_col="url",
        caption_col="caption" if save_caption else None,
        **FAST,
    )
    if output_format == "files":
        texts = [p.read_text() for p in files_of(out, "txt")]
    else:
        with tarfile.open(out / "00000.tar") as tar:
            members = sorted(n for n in tar.getnames() if n.endswith(".txt"))
            texts = [tar.extractfile(n).read().decode() for n in members]  # type: ignore[union-attr]
    assert texts == (CAPTIONS if save_caption else [])
    assert ("caption" in metadata(out)[0]) == save_caption


def test_extra_columns_keep_their_values_and_types(server: ImageServer, tmp_path: Path) -> None:
    url_list = write_url_file(
        tmp_path / "url_list.parquet",
        urls(server)[:2],
        extra={"license": ["cc-by", "cc0"], "score": [0.5, 0.25], "tags": [["a"], ["b", "c"]]},
    )
    out = tmp_path / "images"
    download(
        str(url_list),
        input_format="parquet",
        output_folder=str(out),
        output_format="webdataset",
        save_additional_columns=["license", "score", "tags"],
        **FAST,
    )
    rows = metadata(out)
    assert [(r["license"], r["score"], r["tags"]) for r in rows] == [
        ("cc-by", 0.5, ["a"]),
        ("cc0", 0.25, ["b", "c"]),
    ]
    with tarfile.open(out / "00000.tar") as tar:
        sample = json.loads(tar.extractfile("000000001.json").read())  # type: ignore[union-attr]
    assert (sample["license"], sample["tags"]) == ("cc0", ["b", "c"])


def test_webdataset(server: ImageServer, tmp_path: Path) -> None:
    url_list = write_url_file(tmp_path / "url_list.txt", urls(server))
    out = tmp_path / "images"
    download(str(url_list), image_size=256, output_folder=str(out), output_format="webdataset", **FAST)
    with tarfile.open(out / "00000.tar") as tar:
        assert len(tar.getnames()) == 2 * len(IMAGES)


def test_relative_path(server: ImageServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write_url_file(tmp_path / "lists" / "url_list.txt", urls(server))
    download(
        os.path.join("lists", "url_list.txt"),
        image_size=256,
        output_folder="images",
        output_format="webdataset",
        **FAST,
    )
    with tarfile.open(tmp_path / "images" / "00000.tar") as tar:
        assert len(tar.getnames()) == 2 * len(IMAGES)


def test_the_multiprocessing_distributor(server: ImageServer, tmp_path: Path) -> None:
    # img2dataset's default, by name; "ray" and "pyspark" are in test_distributors.py, on clusters.
    url_list = write_url_file(tmp_path / "url_list.txt", urls(server))
    download(str(url_list), output_folder=str(tmp_path / "images"), distributor="multiprocessing", **FAST)
    assert (tmp_path / "images" / "00000_stats.json").exists()


# -- bounding-box blur -------------------------------------------------------------------------------

BLUR_BOX = [0.25, 0.25, 0.5, 0.6]  # relative to the photo: [x_min, y_min, x_max, y_max]


@pytest.mark.parametrize("resize_only_if_bigger", [False, True])
@pytest.mark.parametrize("resize_mode", ["no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"])
def test_blur_and_resize(
    server: ImageServer, tmp_path: Path, resize_mode: str, resize_only_if_bigger: bool
) -> None:
    photo, (width, height) = (
        "/samples/chelsea_451x300_exif.jpg",
        GOOD_IMAGES["/samples/chelsea_451x300_exif.jpg"],
    )
    url_list = write_url_file(tmp_path / "blur.parquet", [server.url(photo)], extra={"bboxes": [[BLUR_BOX]]})
    common = {
        "input_format": "parquet",
        "image_size": 400,
        "resize_mode": resize_mode,
        "resize_only_if_bigger": resize_only_if_bigger,
        "encode_format": "png",  # lossless, so that untouched pixels compare equal
        "encode_quality": 1,
        **FAST,
    }
    download(str(url_list), output_folder=str(tmp_path / "blurred"), bbox_col="bboxes", **common)
    download(str(url_list), output_folder=str(tmp_path / "plain"), **common)
    (blurred_path,), (plain_path,) = (
        files_of(tmp_path / "blurred", "png"),
        files_of(tmp_path / "plain", "png"),
    )
    blurred = cv2.imread(str(blurred_path)).astype(np.int16)
    plain = cv2.imread(str(plain_path)).astype(np.int16)
    assert blurred.shape == plain.shape
    assert (blurred.shape[1], blurred.shape[0]) == expected_size(
        width, height, 400, resize_mode, resize_only_if_bigger
    )

    # Where the box lands in the output: scaled like the image, then shifted by padding or cropping.
    (row,) = metadata(tmp_path / "blurred")
    assert row["bboxes"] == [BLUR_BOX]
    scaled_w, scaled_h = _scaled(width, height, 400, resize_mode, resize_only_if_bigger)
    dx = (blurred.shape[1] - scaled_w) // 2
    dy = (blurred.shape[0] - scaled_h) // 2
    x0, y0 = dx + int(BLUR_BOX[0] * scaled_w), dy + int(BLUR_BOX[1] * scaled_h)
    x1, y1 = dx + int(BLUR_BOX[2] * scaled_w), dy + int(BLUR_BOX[3] * scaled_h)
    inside = (slice(y0 + 3, y1 - 3), slice(x0 + 3, x1 - 3))
    # Inside the box the photo's detail is gone (less local contrast); far outside, pixels are untouched.
    detail = lambda img: float(np.abs(np.diff(img[inside], axis=1)).mean())  # noqa: E731
    assert detail(blurred) < 0.6 * detail(plain)
    margin = max(x1 - x0, y1 - y0)
    far = np.ones(plain.shape[:2], bool)
    far[max(0, y0 - margin) : y1 + margin, max(0, x0 - margin) : x1 + margin] = False
    assert far.any()
    assert np.array_equal(blurred[far], plain[far])


def _scaled(width: int, height: int, side: int, mode: str, only_if_bigger: bool) -> tuple[int, int]:
    """The image's size after scaling, before padding or cropping."""
    if mode in ("border", "keep_ratio_largest"):
        reference = max(width, height)
    elif mode in ("keep_ratio", "center_crop"):
        reference = min(width, height)
    else:
        return width, height
    if only_if_bigger and reference <= side:
        return width, height
    return max(1, round(width * side / reference)), max(1, round(height * side / reference))


# -- hashes -----------------------------------------------------------------------------------------


def test_verify_hash(server: ImageServer, tmp_path: Path) -> None:
    good = [server.url(p) for p, _ in IMAGES[:3]]
    hashes = [hashlib.sha256(fetch(server, p)).hexdigest() for p, _ in IMAGES[:3]]
    hashes[1] = "0" * 64  # this one does not match what the server sends
    url_list = write_url_file(
        tmp_path / "url_list.parquet", good, extra={"expected": hashes, "note": ["a", "b", "c"]}
    )
    out = tmp_path / "images"
    download(
        str(url_list),
        input_format="parquet",
        output_folder=str(out),
        output_format="webdataset",
        verify_hash=["expected", "sha256"],
        save_additional_columns=["note"],
        **FAST,
    )
    rows = metadata(out)
    assert [r["status"] for r in rows] == ["success", "failed_to_download", "success"]
    assert rows[1]["error_message"] == "hash mismatch"
    # The verified column is not copied; the computed hash is, under the hash type's name.
    assert "expected" not in rows[0]
    assert [r["sha256"] for r in rows] == [hashes[0], None, hashes[2]]
    assert list(rows[0])[:3] == ["note", "sha256", "url"]
    with tarfile.open(out / "00000.tar") as tar:
        assert sorted(n for n in tar.getnames() if n.endswith(".jpg")) == ["000000000.jpg", "000000002.jpg"]


def test_verify_hash_must_be_the_computed_hash(tmp_path: Path) -> None:
    url_list = write_url_file(tmp_path / "url_list.parquet", ["http://127.0.0.1:9/a.jpg"], extra={"h": ["x"]})
    with pytest.raises(ConfigError, match="verify_hash"):
        download(
            str(url_list), output_folder=str(tmp_path / "o"), verify_hash=["h", "md5"], compute_hash="sha256"
        )


def test_disable_all_reencoding_keeps_the_downloaded_bytes(server: ImageServer, tmp_path: Path) -> None:
    paths = ["/gen/100x300.png?alpha=1", "/samples/chelsea_451x300_exif.jpg", "/html"]
    url_list = write_url_file(tmp_path / "url_list.txt", [server.url(p) for p in paths])
    out = tmp_path / "images"
    download(
        str(url_list), output_folder=str(out), output_format="webdataset", disable_all_reencoding=True, **FAST
    )
    with tarfile.open(out / "00000.tar") as tar:
        kept = [tar.extractfile(f"00000000{i}.jpg").read() for i in range(3)]  # type: ignore[union-attr]
    assert kept == [fetch(server, p) for p in paths]  # not even the HTML page is checked
    rows = metadata(out)
    assert [r["status"] for r in rows] == ["success"] * 3
    assert [r["width"] for r in rows] == [None] * 3


# -- incremental modes -------------------------------------------------------------------------------


def test_incremental_mode_uses_the_partition_status(server: ImageServer, tmp_path: Path) -> None:
    url_list = write_url_file(tmp_path / "url_list.txt", urls(server))
    out = tmp_path / "images"
    args: dict[str, Any] = {"output_folder": str(out), "number_sample_per_shard": 3, **FAST}
    download(str(url_list), **args)
    # A shard whose files were removed by hand still counts as done: Dagster's status decides.
    (out / "00001_stats.json").unlink()
    report = download(str(url_list), incremental_mode="incremental", **args)
    assert report.shards_built == []
    assert report.shards_skipped == ["url_list/00000", "url_list/00001"]


def test_incremental_mode_overwrite_starts_over(server: ImageServer, tmp_path: Path) -> None:
    url_list = write_url_file(tmp_path / "url_list.txt", urls(server))
    out = tmp_path / "images"
    args: dict[str, Any] = {"output_folder": str(out), "output_format": "webdataset", **FAST}
    download(str(url_list), number_sample_per_shard=2, **args)
    assert len(list(out.glob("*.tar"))) == math.ceil(len(IMAGES) / 2)
    (out / "stray.txt").write_text("left by someone")
    report = download(str(url_list), number_sample_per_shard=100, incremental_mode="overwrite", **args)
    assert report.shards_built == ["url_list/00000"]
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "00000.parquet",
        "00000.tar",
        "00000_stats.json",
    ]
    assert report.totals["count"] == len(IMAGES)


def test_incremental_mode_extend_adds_shards_after_the_existing_ones(
    server: ImageServer, tmp_path: Path
) -> None:
    first = write_url_file(tmp_path / "part1.txt", urls(server))
    second = write_url_file(tmp_path / "part2.txt", urls(server)[:2])
    out = tmp_path / "images"
    args: dict[str, Any] = {"output_folder": str(out), "output_format": "webdataset", **FAST}
    download(str(first), **args)
    report = download(str(second), incremental_mode="extend", **args)
    assert report.shards_built == ["part2/00001"]
    again = download(str(second), incremental_mode="extend", **args)  # the same file again is new data
    assert again.shards_built == ["part2-2/00002"]
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar", "00001.tar", "00002.tar"]
    assert [r["key"] for r in metadata(out)][-2:] == ["000020000", "000020001"]
    # Without extend, a different file would overwrite shard 00000: refused, naming both files.
    with pytest.raises(ConfigError, match=r"part3.txt would write shards that .*part1.txt"):
        download(str(write_url_file(tmp_path / "part3.txt", urls(server))), **args)
    assert len(metadata(out)) == len(IMAGES) + 4
