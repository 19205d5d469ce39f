"""img2ds_dagster: img2dataset's downloader as Dagster assets.

``from img2ds_dagster import download`` is img2dataset's ``download()``, and ``export_buckets`` the
bucketed export of its output. They are loaded on first use, so that worker processes importing only
the engine do not pay for importing Dagster.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .api import download
    from .export import export_buckets

__all__ = ["download", "export_buckets"]


def __getattr__(name: str) -> Any:
    if name == "download":
        from .api import download  # noqa: PLC0415 - deferred on purpose, see above

        return download
    if name == "export_buckets":
        from .export import export_buckets  # noqa: PLC0415 - deferred on purpose, see above

        return export_buckets
    raise AttributeError(f"module 'img2ds_dagster' has no attribute {name!r}")
