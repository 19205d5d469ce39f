"""img2dataset 1.47 and img2ds_dagster's ``download()`` on the same URL list, one option set after
another: do they write the same files, the same metadata and the same stats?

::

    python -m benchmarks.parity --corpus benchmarks/.corpus [--count 300] [--variants wds,filters] \\
        [--img2dataset-venv DIR] [--json out.json]

The URL list is cut from the corpus (its faults included: 404s, HTML bodies, truncated JPEGs,
``X-Robots-Tag: noai``) and carries a caption, an integer and a text column. For each option set in
``VARIANTS`` both tools run in fresh processes and their outputs are compared:

- the names of the files in the output folder (img2ds_dagster's ``.img2ds/`` state folder aside);
- each metadata parquet's schema: column names and types, in order;
- every metadata row, column by column (``exif`` as parsed JSON), matched by key;
- each stats file's keys, counts and count of each error message;
- each sample: the same member files, the same JSON sidecar and caption, and images of the same
  size (for ``parquet``, the image column). Their pixels differ by design (README: the reduced
  decode and two-step resize), so the PSNR between them is reported, not judged.

The exit status is 1 when anything but the pixels differs. img2dataset 1.47 cannot write
``tfrecord`` without TensorFlow, which it does not install, so that format is compared by the test
suite's round trip only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .corpus import load_corpus, url_rows
from .server import serve_corpus
from .side_by_side import ROOT, command, ensure_img2dataset, psnr_db

BASE = {
    "image_size": 128,
    "number_sample_per_shard": 100,
    "processes_count": 1,
    "thread_count": 16,
    "timeout": 10,
    "input_format": "parquet",
    "caption_col": "caption",
}
WEBDATASET = {"output_format": "webdataset"}
VARIANTS: dict[str, dict[str, Any]] = {
    "files": {},
    "webdataset": WEBDATASET,
    "parquet": {"output_format": "parquet"},
    "keep_ratio_png": {
        **WEBDATASET,
        "resize_mode": "keep_ratio",
        "encode_format": "png",
        "encode_quality": 9,
    },
    "center_crop_webp": {**WEBDATASET, "resize_mode": "center_crop", "encode_format": "webp"},
    "no_resize": {**WEBDATASET, "resize_mode": "no"},
    "keep_ratio_largest_only_bigger": {
        **WEBDATASET,
        "resize_mode": "keep_ratio_largest",
        "resize_only_if_bigger": True,
    },
    "filters": {**WEBDATASET, "min_image_size": 200, "max_aspect_ratio": 2.0, "max_image_area": 2e6},
    "extra_columns_md5_no_exif": {
        **WEBDATASET,
        "save_additional_columns": ["extra_int", "extra_str"],
        "compute_hash": "md5",
        "extract_exif": False,
    },
    "skip_reencode": {**WEBDATASET, "resize_mode": "no", "skip_reencode": True},
    "disable_all_reencoding": {**WEBDATASET, "disable_all_reencoding": True},
    "no_caption_no_hash": {**WEBDATASET, "caption_col": None, "compute_hash": None},
    "noai_allowed": {**WEBDATASET, "disallowed_header_directives": []},
    "oom_3_quality_80_size_256": {
        **WEBDATASET,
        "oom_shard_count": 3,
        "encode_quality": 80,
        "image_size": 256,
    },
}
IMAGE_EXTS = ("jpg", "png", "webp")


@dataclass
class Comparison:
    variant: str
    rows: int = 0
    samples: int = 0
    differences: list[str] = field(default_factory=list)
    psnr_median_db: float | None = None
    psnr_min_db: float | None = None


# Keys img2ds_dagster adds to a shard's stats file (the README's differences table says so).
OUR_STATS_KEYS = {"retry_waits", "retry_wait_seconds", "opt_outs", "worker"}


def run(tool: str, options: dict[str, Any], out: Path, img2dataset_python: Path) -> None:
    shutil.rmtree(out, ignore_errors=True)
    cmd = command(tool, {**options, "output_folder": str(out)}, img2dataset_python)
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}  # albumentations checks for updates otherwise
    done = subprocess.run(cmd, check=False, cwd=ROOT.parent, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{tool} failed on {out.parent.name}:\n{done.stderr[-3000:]}")


def file_names(folder: Path) -> list[str]:
    return sorted(
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if p.is_file() and p.relative_to(folder).parts[0] != ".img2ds"
    )


def metadata(folder: Path) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """Each shard parquet's schema, and every row by key."""
    schemas: list[str] = []
    rows: dict[str, dict[str, Any]] = {}
    for path in sorted(folder.glob("*.parquet")):
        table = pq.read_table(path)
        schemas.append(str(table.schema.remove_metadata()))
        rows.update((row["key"], row) for row in table.to_pylist())
    return schemas, rows


def samples(folder: Path, output_format: str) -> dict[str, dict[str, bytes]]:
    """key -> file extension -> bytes of each successful sample (images only for parquet)."""
    found: dict[str, dict[str, bytes]] = {}
    if output_format == "parquet":
        for key, row in metadata(folder)[1].items():
            images = {ext: row[ext] for ext in IMAGE_EXTS if row.get(ext)}
            if images:
                found[key] = images
    if output_format == "webdataset":
        for path in sorted(folder.glob("*.tar")):
            with tarfile.open(path) as tar:
                for member in tar.getmembers():
                    key, ext = member.name.split(".", 1)
                    data = tar.extractfile(member)
                    assert data is not None
                    found.setdefault(key, {})[ext] = data.read()
    elif output_format == "files":
        for path in folder.glob("*/*"):
            if path.parent.name != ".img2ds" and path.is_file():
                key, ext = path.name.split(".", 1)
                found.setdefault(key, {})[ext] = path.read_bytes()
    return found


def _exif(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def _psnr(a: bytes, b: bytes) -> float | None:
    """None when either does not decode or their sizes differ."""
    x = cv2.imdecode(np.frombuffer(a, np.uint8), cv2.IMREAD_UNCHANGED)
    y = cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_UNCHANGED)
    if x is None or y is None or x.shape != y.shape:
        return None
    return psnr_db(x, y)


def compare(variant: str, reference: Path, candidate: Path, output_format: str) -> Comparison:
    result = Comparison(variant)
    diff = result.differences
    ref_names, cand_names = file_names(reference), file_names(candidate)
    if ref_names != cand_names:
        only_ref, only_cand = (
            sorted(set(ref_names) - set(cand_names)),
            sorted(set(cand_names) - set(ref_names)),
        )
        diff.append(f"files: only img2dataset's {only_ref[:5]}, only img2ds_dagster's {only_cand[:5]}")
    ref_schemas, ref_rows = metadata(reference)
    cand_schemas, cand_rows = metadata(candidate)
    result.rows = len(ref_rows)
    if ref_schemas != cand_schemas:
        diff.append(
            f"metadata schema:\n  img2dataset:   {ref_schemas[:1]}\n  img2ds_dagster: {cand_schemas[:1]}"
        )
    if set(ref_rows) != set(cand_rows):
        diff.append(f"metadata keys differ ({len(ref_rows)} rows against {len(cand_rows)})")
    by_column: dict[str, list[str]] = {}
    for key in sorted(set(ref_rows) & set(cand_rows)):
        a, b = ref_rows[key], cand_rows[key]
        for column in sorted(set(a) | set(b)):
            x, y = a.get(column), b.get(column)
            if column == "exif":
                x, y = _exif(x), _exif(y)
            if column not in IMAGE_EXTS and x != y:
                by_column.setdefault(column, []).append(f"{key}: {str(x)[:60]!r} / {str(y)[:60]!r}")
    for column, rows in by_column.items():
        diff.append(f"metadata column {column}: {len(rows)} rows differ, e.g. {rows[:3]}")
    for ref_stats in sorted(reference.glob("*_stats.json")):
        cand_stats = candidate / ref_stats.name
        if not cand_stats.exists():
            continue  # already reported with the file names
        a, b = json.loads(ref_stats.read_text()), json.loads(cand_stats.read_text())
        if set(a) != set(b) - OUR_STATS_KEYS:
            diff.append(
                f"{ref_stats.name} keys: only img2dataset's {set(a) - set(b)}, only ours {set(b) - set(a)}"
            )
        for name in ("count", "successes", "failed_to_download", "failed_to_resize", "status_dict"):
            if a.get(name) != b.get(name):
                diff.append(f"{ref_stats.name} {name}: {a.get(name)} / {b.get(name)}")
    ref_samples, cand_samples = samples(reference, output_format), samples(candidate, output_format)
    result.samples = len(ref_samples)
    if set(ref_samples) != set(cand_samples):
        diff.append(f"sample keys differ ({len(ref_samples)} samples against {len(cand_samples)})")
    psnr = []
    for key in sorted(set(ref_samples) & set(cand_samples)):
        a, b = ref_samples[key], cand_samples[key]
        if set(a) != set(b):
            diff.append(f"sample {key}: members {sorted(a)} / {sorted(b)}")
            continue
        for ext in a:
            if ext == "json":
                x, y = json.loads(a[ext]), json.loads(b[ext])
                x["exif"], y["exif"] = _exif(x.get("exif")), _exif(y.get("exif"))
                if x != y:
                    changed = sorted(k for k in set(x) | set(y) if x.get(k) != y.get(k))
                    diff.append(f"sample {key}.json: {changed} differ")
            elif ext in IMAGE_EXTS:
                value = _psnr(a[ext], b[ext])
                if value is not None:
                    psnr.append(value)
                elif a[ext] != b[ext]:
                    diff.append(f"sample {key}.{ext}: not the same size, or does not decode")
            elif a[ext] != b[ext]:
                diff.append(f"sample {key}.{ext}: differs")
    if psnr:
        result.psnr_median_db, result.psnr_min_db = statistics.median(psnr), min(psnr)
    return result


def url_table(corpus: str, base: str, count: int) -> pa.Table:
    rows = url_rows(load_corpus(corpus), base, count, seed=3)
    return pa.table(
        {
            "url": [url for url, _ in rows],
            "caption": [caption for _, caption in rows],
            "extra_int": list(range(len(rows))),
            "extra_str": [f"row {i}" for i in range(len(rows))],
        }
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--corpus", default=str(ROOT / ".corpus"))
    parser.add_argument("--work", default=str(ROOT / ".work" / "parity"))
    parser.add_argument("--count", type=int, default=300, help="URLs in the list")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="option sets to compare")
    parser.add_argument("--img2dataset-venv", default=str(ROOT / ".venv-img2dataset"))
    parser.add_argument("--json", help="write the comparisons here")
    args = parser.parse_args()
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    python = ensure_img2dataset(Path(args.img2dataset_venv))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = []
    with serve_corpus(args.corpus) as base:
        url_list = work / "urls.parquet"
        pq.write_table(url_table(args.corpus, base, args.count), url_list)
        for variant in args.variants.split(","):
            options = {**BASE, **VARIANTS[variant], "url_list": str(url_list)}
            options = {k: v for k, v in options.items() if not (k == "caption_col" and v is None)}
            for tool in ("img2dataset", "download"):
                run(tool, options, work / variant / tool, python)
            result = compare(
                variant,
                work / variant / "img2dataset",
                work / variant / "download",
                options.get("output_format", "files"),
            )
            results.append(result)
            psnr = (
                f"PSNR median {result.psnr_median_db:.1f} dB, min {result.psnr_min_db:.1f}"
                if result.psnr_median_db
                else "no images compared"
            )
            verdict = "same" if not result.differences else f"{len(result.differences)} differences"
            print(f"{variant}: {result.rows} rows, {result.samples} samples: {verdict}; {psnr}", flush=True)
            for line in result.differences[:20]:
                print(f"    {line}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "count": args.count,
                    "base_options": BASE,
                    "variants": VARIANTS,
                    "results": [asdict(r) for r in results],
                },
                indent=2,
            )
        )
    return 1 if any(r.differences for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
