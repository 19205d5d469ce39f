"""The project's exceptions.

Per-sample problems (a 404, an undecodable body) are never exceptions: they are data, a status and an
error message in the shard's metadata. Exceptions are for problems that stop a table or a shard::

    Img2dsError
    ├── ConfigError                 an option has a bad value (names the option)
    ├── InputTableError             a URL file cannot be used (names the file, and the column or row)
    ├── ShardError                  one shard could not be produced (names the shard); Dagster retries it
    │   └── StagingMissingError     the shard's staged input rows are gone: re-materialize its url_table
    └── ExportError                 the bucketed export cannot be made (names the shard or table)
"""

from __future__ import annotations


class Img2dsError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(Img2dsError, ValueError):
    """An option has a value that cannot work; the message names the option."""


class InputTableError(Img2dsError, ValueError):
    """A URL file is unreadable or invalid; the message names the file and the column or row."""


class ShardError(Img2dsError):
    """A whole shard failed (as opposed to some of its samples); the message names the shard."""


class StagingMissingError(ShardError):
    """The staged input rows of a shard are missing, so the shard cannot be (re)built."""


class ExportError(Img2dsError, ValueError):
    """The bucketed export cannot be made from these shards; the message names the shard or table
    and what it needs."""
