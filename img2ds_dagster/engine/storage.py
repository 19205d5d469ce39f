"""Paths on any fsspec filesystem, and atomic writes.

Local files are written under a temporary name in the same folder and renamed into place, so a crash
never leaves a file that looks complete. Files for any other filesystem (S3, GCS, memory, ...) are
written to a local temporary file and uploaded in one go once complete: a failed shard never leaves a
partial object, and the previous object stays in place until the new one is whole.
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


def write_bytes_atomic(path: str, data: bytes) -> None:
    with atomic_open(path) as f:
        f.write(data)


def write_json_atomic(path: str, obj: Any) -> None:
    write_bytes_atomic(path, json.dumps(obj, indent=4).encode())


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
    """A folder filled under a temporary name and swapped into place on ``commit()``.

    Used by the ``files`` output format, whose shard is a folder of per-sample files.
    """

    def __init__(self, path: str) -> None:
        self.path = path.rstrip("/")
        self._local = local_path(self.path)
        if self._local is not None:
            self.work = _temp_name(self._local)
            os.makedirs(self.work)
        else:
            # Object stores have no folders to swap: the old objects are removed first.
            remove(self.path)
            self.work = self.path

    def write(self, name: str, data: bytes) -> None:
        if self._local is not None:
            with open(os.path.join(self.work, name), "wb") as f:
                f.write(data)
        else:
            fs, p = fsspec.core.url_to_fs(join(self.work, name))
            fs.pipe_file(p, data)

    def commit(self) -> None:
        if self._local is None:
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
        else:  # the files written so far (the old ones went in __init__)
            remove(self.work)
