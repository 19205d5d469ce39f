"""img2ds_dagster: img2dataset's downloader as Dagster assets.

``from img2ds_dagster import download`` is img2dataset's ``download()``. It is loaded on first use, so
that worker processes importing only the engine do not pay for importing Dagster.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .api import download

__all__ = ["download"]


def __getattr__(name: str) -> Any:
    if name == "download":
        from .api import download  # noqa: PLC0415 - deferred on purpose, see above

        return download
    raise AttributeError(f"module 'img2ds_dagster' has no attribute {name!r}")
