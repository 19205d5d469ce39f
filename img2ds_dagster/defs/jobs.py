"""The jobs a user picks from the launchpad and the inbox and shard sensors launch: ``stage_table``
and ``build_shards``. (``refresh_stats`` and ``export_buckets`` are defined beside their assets and
sensors, in stats.py and export.py.)

A table is downloaded end to end in two partition sets (a table, then its shards), which one
Dagster job cannot span: ``stage_table`` stages it and ``new_shards_sensor`` follows with
``build_shards`` runs."""

import dagster as dg

from .shards import shards
from .url_tables import url_tables

stage_table = dg.define_asset_job(
    "stage_table",
    selection=[url_tables],
    description=(
        "Stage a URL file (pick it as the partition): read, validate, cut into shards, register "
        "them; new_shards_sensor then builds them."
    ),
)
build_shards = dg.define_asset_job(
    "build_shards",
    selection=[shards],
    description=(
        "Download, resize and write shards: pick one, a range, or the failed ones (the partition "
        "list's Failed filter)."
    ),
)
