"""Paths on any fsspec filesystem, and atomic writes.

Local files are written under a temporary name in the same folder and renamed into place, so a crash
never leaves a file that looks complete. Files for any other filesystem (S3, GCS, memory, ...) are
written to a local temporary file and uploaded in one go once complete: a failed shard never leaves a
partial object, and the previous object stays in place until the new one is whole. A folder of files
(``AtomicFolder``) is swapped into place locally; on an object store its objects are overwritten and
the old version's leftovers deleted at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from typing import IO, Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

# s3fs keeps every listing for the life of the process and then answers "no such file" for an object
# another process wrote since: a sensor in a long-lived code server would never see a new drop, nor a
# stats refresh a newly staged table. The pipeline lists rarely, so every listing asks the store.
# (Credentials and the endpoint reach s3fs through the standard AWS variables, AWS_ENDPOINT_URL
# included, which botocore reads by itself: see the README, "S3 and other storage".)
fsspec.config.conf.setdefault("s3", {}).setdefault("use_listings_cache", False)


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
    return os.path.join(folder, f".{name}.tmp-{uuid.uuid4().hex[:12]}")


class AtomicFile:
    """A binary file that appears at ``path`` on ``commit()``; ``abort()`` leaves no trace of it.

    Write to ``file``. Local paths get a temporary name in the target folder, renamed into place;
    other filesystems get a local temporary file in ``spool_dir`` (default: the system's temporary
    folder), uploaded whole by ``commit()``.
    """

    def __init__(self, path: str, spool_dir: str | None = None) -> None:
        self.path = path
        self._local = local_path(path)
        if self._local is not None:
            os.makedirs(os.path.dirname(self._local) or ".", exist_ok=True)
            self._tmp = _temp_name(self._local)
            self.file: IO[bytes] = open(self._tmp, "wb")  # noqa: SIM115 (closed by commit or abort)
        else:
            self.file = tempfile.NamedTemporaryFile(  # noqa: SIM115
                prefix="img2ds-upload-", dir=spool_dir, delete=False
            )
            self._tmp = self.file.name

    def commit(self) -> None:
        self.file.close()
        try:
            if self._local is not None:
                os.replace(self._tmp, self._local)
                return
            fs, p = fsspec.core.url_to_fs(self.path)
            fs.put_file(self._tmp, p)
        finally:
            self._discard()

    def abort(self) -> None:
        self.file.close()
        self._discard()

    def _discard(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(self._tmp)


@contextlib.contextmanager
def atomic_open(path: str, spool_dir: str | None = None) -> Iterator[IO[bytes]]:
    """A binary file that appears at ``path`` only if the ``with`` block succeeds."""
    atomic = AtomicFile(path, spool_dir)
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


def exists(path: str) -> bool:
    fs, p = fsspec.core.url_to_fs(path)
    return bool(fs.exists(p))


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


class AtomicFolder:
    """A folder whose new contents replace the old ones on ``commit()``; ``abort()`` keeps the old ones.

    Used by the ``files`` output format, whose shard is a folder of per-sample files. A local folder
    is filled under a temporary name and swapped into place. An object store has no folder to swap,
    and copying every object into place would double the requests: the new objects are uploaded over
    the old ones instead (a shard's file names are the same from one build to the next), in
    concurrent batches. ``commit()`` then deletes the old objects the new version does not have, and
    ``abort()`` the new ones the old version did not have: after a failed rewrite the folder has the
    old version's names, though the objects written before the failure already hold their new bytes.
    """

    BATCH_OBJECTS = 256  # objects uploaded at once (s3fs sends them concurrently)
    BATCH_BYTES = 32 << 20  # and at most this many bytes held for the next batch

    def __init__(self, path: str) -> None:
        self.path = path.rstrip("/")
        self._local = local_path(self.path)
        if self._local is not None:
            self.work = _temp_name(self._local)
            os.makedirs(self.work)
            return
        self._fs, self._root = fsspec.core.url_to_fs(self.path)
        self._before = self._objects()
        self._written: set[str] = set()
        self._batch: dict[str, bytes] = {}
        self._batch_bytes = 0

    def write(self, name: str, data: bytes) -> None:
        if self._local is not None:
            with open(os.path.join(self.work, name), "wb") as f:
                f.write(data)
            return
        self._batch[f"{self._root}/{name}"] = data
        self._batch_bytes += len(data)
        if len(self._batch) >= self.BATCH_OBJECTS or self._batch_bytes >= self.BATCH_BYTES:
            self._upload()

    def commit(self) -> None:
        if self._local is None:
            self._upload()
            self._delete(self._objects() - self._written)
            return
        old = None
        if os.path.exists(self._local):
            old = _temp_name(self._local)
            os.replace(self._local, old)
        os.replace(self.work, self._local)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        if self._local is not None:
            shutil.rmtree(self.work, ignore_errors=True)
            return
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
