"""The ``shards`` asset's checks, evaluated on each shard as its run builds it (engine/verify.py):

- ``shard_is_complete`` (blocking, error): one metadata row per staged row, each success's files in
  the shard once and nothing else, the stats file agreeing;
- ``success_rate`` (warning): the share of successful samples against the table's
  ``min_success_rate``.

A run builds a range of shards, and Dagster gives a check result the step's partition only when
the step has one: so each shard's results are logged with its partition key, and the step ends with
one result per check over all of its shards.
"""

# No `from __future__ import annotations` here: Dagster reads annotations at definition time.

import warnings
from collections.abc import Iterator

import dagster as dg
from dagster._core.definitions.asset_checks.asset_check_evaluation import AssetCheckEvaluation

from ..engine.pictures import contact_sheet, markdown_image
from ..engine.shard import ShardResult
from ..engine.sources import TableManifest
from ..engine.verify import ShardReport, WrittenShard, verify_shard
from .partitions import SHARDS, shards_partitions

COMPLETE = "shard_is_complete"
SUCCESS_RATE = "success_rate"


def shard_check_specs() -> list[dg.AssetCheckSpec]:
    # Partitioned checks are a preview in Dagster 1.13; relied on here on purpose (a result per
    # shard), so its warning is not shown to every user at import.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*partitions_def on an AssetCheckSpec")
        return _specs()


def _specs() -> list[dg.AssetCheckSpec]:
    return [
        dg.AssetCheckSpec(
            COMPLETE,
            asset=SHARDS,
            blocking=True,
            partitions_def=shards_partitions,
            description="One metadata row per staged input row; every success's image, json and caption "
            "in the shard once and nothing else; the stats file agrees with the metadata.",
        ),
        dg.AssetCheckSpec(
            SUCCESS_RATE,
            asset=SHARDS,
            partitions_def=shards_partitions,
            description="The share of successful samples is at least the table's min_success_rate "
            "(a warning, not a failure).",
        ),
    ]


def staged_rows(manifest: TableManifest, shard_id: int) -> int:
    """How many input rows the table staged for this shard (every shard is full but the last)."""
    size = manifest.settings.source.number_sample_per_shard
    return max(0, min(size, manifest.row_count - (shard_id - manifest.first_shard_id) * size))


def inspect_shard(manifest: TableManifest, result: ShardResult) -> ShardReport:
    """The built shard read back: its checks' findings and the images of its contact sheet."""
    settings = manifest.settings
    written = WrittenShard(
        folder=result.output_folder,
        name=result.name,
        output_format=result.output_format,
        encode_format=settings.image.encode_format,
        staged_rows=staged_rows(manifest, result.shard_id),
        save_caption=settings.source.caption_col is not None,
    )
    return verify_shard(written, previews=24)


def contact_sheet_metadata(report: ShardReport) -> dict[str, dg.MetadataValue]:
    sheet = contact_sheet(report.previews)
    if sheet is None:
        return {}
    return {"contact_sheet": dg.MetadataValue.md(markdown_image(sheet, "image/jpeg", "contact sheet"))}


def evaluations(
    key: str, report: ShardReport, min_success_rate: float
) -> Iterator[tuple[str, bool, dg.AssetCheckSeverity, dict[str, dg.MetadataValue]]]:
    """(check, passed, severity, metadata) of one shard."""
    yield (
        COMPLETE,
        report.complete,
        dg.AssetCheckSeverity.ERROR,
        {
            "rows": dg.MetadataValue.int(report.rows),
            "problems": dg.MetadataValue.md("\n".join(f"- {p}" for p in report.problems) or "none"),
        },
    )
    yield (
        SUCCESS_RATE,
        report.success_rate >= min_success_rate,
        dg.AssetCheckSeverity.WARN,
        {
            "success_rate": dg.MetadataValue.float(round(report.success_rate, 4)),
            "min_success_rate": dg.MetadataValue.float(min_success_rate),
        },
    )


def log_shard_checks(
    context: dg.AssetExecutionContext, key: str, report: ShardReport, min_success_rate: float
) -> None:
    """Log the shard's check results under its partition key."""
    for name, passed, severity, metadata in evaluations(key, report, min_success_rate):
        context.log_event(
            AssetCheckEvaluation(
                asset_key=context.asset_key,
                check_name=name,
                passed=passed,
                metadata=metadata,
                severity=severity,
                partition=key,
                blocking=name == COMPLETE,
            )
        )


def step_results(
    reports: dict[str, tuple[ShardReport, float]], logged: bool
) -> Iterator[dg.AssetCheckResult]:
    """The step's result of each check. A step of one shard has that shard's (Dagster gives it the
    step's partition); a step of several logged each shard's already: here, the count over them."""
    if not logged and len(reports) == 1:
        ((key, (report, threshold)),) = reports.items()
        for name, passed, severity, metadata in evaluations(key, report, threshold):
            yield dg.AssetCheckResult(check_name=name, passed=passed, severity=severity, metadata=metadata)
        return
    for name, severity in (
        (COMPLETE, dg.AssetCheckSeverity.ERROR),
        (SUCCESS_RATE, dg.AssetCheckSeverity.WARN),
    ):
        failed = sorted(
            key
            for key, (report, threshold) in reports.items()
            if not next(p for n, p, _, _ in evaluations(key, report, threshold) if n == name)
        )
        yield dg.AssetCheckResult(
            check_name=name,
            passed=not failed,
            severity=severity,
            description=f"{len(reports) - len(failed)} of {len(reports)} shards of this run passed",
            metadata={"failed_shards": dg.MetadataValue.json(failed[:100])},
        )
