"""Paths on any fsspec filesystem, and atomic writes: a file or a folder that appears whole or not at
all, each with a local class and an object-store class behind one small interface.

Local files are written under a hidden temporary name in the same folder (``.<name>.tmp-<random>``)
and renamed into place, so a crash never leaves a file that looks complete; the next build of the
same shard removes what a killed process left under such names (``remove_leftovers``). Files for any
other filesystem (S3, GCS, memory, ...) are written to an unnamed local temporary file and uploaded
once complete; a failed one is discarded, never uploaded. A folder of files is swapped into place
locally; on an object store its objects are overwritten and the old version's leftovers deleted.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from typing import IO, Any, Protocol

import fsspec
from fsspec.implementations.local import LocalFileSystem

_TEMP_MARK = ".tmp-"
_UPLOAD_CHUNK = 8 << 20


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def local_path(path: str) -> str | None:
    """The OS path of ``path`` when it is on the local filesystem, else None."""
    fs, p = fsspec.core.url_to_fs(path)
    return p if isinstance(fs, LocalFileSystem) else None


def absolute(path: str) -> str:
    """Local paths made absolute (relative paths are relative to the current folder); URLs unchanged."""
    local = local_path(path)
    return os.path.abspath(local) if local is not None else path


def _temp_name(path: str) -> str:
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}{_TEMP_MARK}{uuid.uuid4().hex[:12]}")


def remove_leftovers(folder: str, stem: str) -> list[str]:
    """Remove the temporary files and folders that writing ``<stem>``, ``<stem>.<ext>`` or
    ``<stem>_stats.json`` in a local ``folder`` left behind when its process was killed; returns
    their names. Nothing else is touched: only names of this module's temporary pattern, for this
    stem. (Object-store writes leave nothing: their temporary files have no name.)"""
    local = local_path(folder)
    if local is None or not os.path.isdir(local):
        return []
    pattern = re.compile(
        rf"\.{re.escape(stem)}(\.[A-Za-z0-9]+|_stats\.json)?{re.escape(_TEMP_MARK)}[0-9a-f]{{12}}"
    )
    found = sorted(name for name in os.listdir(local) if pattern.fullmatch(name))
    for name in found:
        remove(os.path.join(local, name))
    return found


class AtomicFile(Protocol):
    """A binary file, written through ``file``, that appears at ``path`` on ``commit()``;
    ``abort()`` leaves no trace of it."""

    path: str
    file: IO[bytes]

    def commit(self) -> None: ...

    def abort(self) -> None: ...


class LocalFile:
    """Written under a hidden temporary name in the target folder and renamed into place."""

    def __init__(self, path: str, local: str) -> None:
        self.path = path
        self._target = local
        os.makedirs(os.path.dirname(local) or ".", exist_ok=True)
        self._tmp = _temp_name(local)
        self.file: IO[bytes] = open(self._tmp, "wb")  # noqa: SIM115 (closed by commit or abort)

    def commit(self) -> None:
        self.file.close()
        try:
            os.replace(self._tmp, self._target)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        self.file.close()
        with contextlib.suppress(FileNotFoundError):
            os.remove(self._tmp)


class StoreFile:
    """Written to an unnamed local temporary file (in ``spool_dir``, default the system's temporary
    folder), then streamed to the store by ``commit()``. An upload that fails is discarded, not
    closed: closing an fsspec file for writing completes its upload, partial or not."""

    def __init__(self, path: str, spool_dir: str | None = None) -> None:
        self.path = path
        self.file: IO[bytes] = tempfile.TemporaryFile(prefix="img2ds-upload-", dir=spool_dir)  # noqa: SIM115

    def commit(self) -> None:
        try:
            self.file.seek(0)
            fs, p = fsspec.core.url_to_fs(self.path)
            out = fs.open(p, "wb")
            try:
                shutil.copyfileobj(self.file, out, _UPLOAD_CHUNK)
            except BaseException:
                _discard(out)
                raise
            out.close()
        finally:
            self.file.close()

    def abort(self) -> None:
        self.file.close()


def _discard(out: Any) -> None:
    """Drop an object-store file being written without completing it: s3fs aborts its multipart
    upload, and the file is marked closed, or its garbage collection would close it."""
    discard = getattr(out, "discard", None)
    if callable(discard):
        discard()
    with contextlib.suppress(AttributeError):
        out.closed = True


def atomic_file(path: str, spool_dir: str | None = None) -> AtomicFile:
    local = local_path(path)
    return LocalFile(path, local) if local is not None else StoreFile(path, spool_dir)


@contextlib.contextmanager
def atomic_open(path: str, spool_dir: str | None = None) -> Iterator[IO[bytes]]:
    """A binary file that appears at ``path`` only if the ``with`` block succeeds."""
    atomic = atomic_file(path, spool_dir)
    try:
        yield atomic.file
    except BaseException:
        atomic.abort()
        raise
    atomic.commit()


def write_bytes_atomic(path: str, data: bytes, spool_dir: str | None = None) -> None:
    with atomic_open(path, spool_dir) as f:
        f.write(data)


def write_json_atomic(path: str, obj: Any, spool_dir: str | None = None) -> None:
    write_bytes_atomic(path, json.dumps(obj, indent=4).encode(), spool_dir)


def read_json(path: str) -> Any:
    with fsspec.open(path, "rb") as f:
        return json.load(f)


def remove(path: str) -> None:
    """Remove a file or a folder tree; nothing if absent."""
    local = local_path(path)
    if local is not None:
        if os.path.isdir(local):
            shutil.rmtree(local, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(local)
        return
    fs, p = fsspec.core.url_to_fs(path)
    if fs.exists(p):
        fs.rm(p, recursive=True)


class AtomicFolder(Protocol):
    """A folder whose new contents replace the old ones on ``commit()``; ``abort()`` keeps the old
    ones. Used by the ``files`` output format, whose shard is a folder of per-sample files."""

    path: str

    def write(self, name: str, data: bytes) -> None: ...

    def commit(self) -> None: ...

    def abort(self) -> None: ...


class LocalFolder:
    """Filled under a hidden temporary name and swapped into place."""

    def __init__(self, path: str, local: str) -> None:
        self.path = path
        self._target = local
        self._work = _temp_name(local)
        os.makedirs(self._work)

    def write(self, name: str, data: bytes) -> None:
        with open(os.path.join(self._work, name), "wb") as f:
            f.write(data)

    def commit(self) -> None:
        old = None
        if os.path.exists(self._target):
            old = _temp_name(self._target)
            os.replace(self._target, old)
        os.replace(self._work, self._target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        shutil.rmtree(self._work, ignore_errors=True)


class StoreFolder:
    """An object store has no folder to swap, and copying every object into place would double the
    requests: the new objects are uploaded over the old ones (a shard's file names are the same from
    one build to the next), in concurrent batches. ``commit()`` then deletes the old objects the new
    version does not have, and ``abort()`` the new ones the old version did not have: after a failed
    rewrite the folder has the old version's names, though the objects written before the failure
    already hold their new bytes."""

    BATCH_OBJECTS = 256  # objects uploaded at once (s3fs sends them concurrently)
    BATCH_BYTES = 32 << 20  # and at most this many bytes held for the next batch

    def __init__(self, path: str) -> None:
        self.path = path
        self._fs, self._root = fsspec.core.url_to_fs(path)
        self._before = self._objects()
        self._written: set[str] = set()
        self._batch: dict[str, bytes] = {}
        self._batch_bytes = 0

    def write(self, name: str, data: bytes) -> None:
        self._batch[f"{self._root}/{name}"] = data
        self._batch_bytes += len(data)
        if len(self._batch) >= self.BATCH_OBJECTS or self._batch_bytes >= self.BATCH_BYTES:
            self._upload()

    def commit(self) -> None:
        self._upload()
        self._delete(self._objects() - self._written)

    def abort(self) -> None:
        self._batch.clear()
        # Listed, not taken from the names written: a batch that failed may have been partly uploaded.
        self._delete(self._objects() - self._before)

    def _upload(self) -> None:
        if self._batch:
            self._fs.pipe(self._batch)
            self._written.update(self._batch)
            self._batch, self._batch_bytes = {}, 0

    def _objects(self) -> set[str]:
        return set(self._fs.find(self._root))  # nothing for a folder that does not exist

    def _delete(self, paths: set[str]) -> None:
        if paths:
            self._fs.rm(sorted(paths))


def atomic_folder(path: str) -> AtomicFolder:
    path = path.rstrip("/")
    local = local_path(path)
    return LocalFolder(path, local) if local is not None else StoreFolder(path)
