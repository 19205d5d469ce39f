"""The inboxes' bookkeeping: which dropped files are new (in a folder, or under an S3 prefix listed
incrementally), and their optional settings files."""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pydantic

from ..config import DownloadConfig, UrlTableConfig, config_error
from ..engine.sources import input_format_of, table_key
from ..errors import ConfigError

SETTINGS_SUFFIX = ".img2ds.toml"
INBOX_SETTINGS = "img2ds.toml"


@dataclass
class DropCursor:
    """High-water modification time, and the files seen at exactly that time (a file landing in the
    same second as the last one picked up is not lost)."""

    mtime: float = 0.0
    seen: set[str] = field(default_factory=set)

    @classmethod
    def parse(cls, raw: str | None) -> DropCursor:
        if not raw:
            return cls()
        data = json.loads(raw)
        return cls(float(data["mtime"]), set(data["seen"]))

    def is_new(self, path: str, mtime: float) -> bool:
        return mtime > self.mtime or (mtime == self.mtime and path not in self.seen)

    def advance(self, path: str, mtime: float) -> None:
        if mtime > self.mtime:
            self.mtime, self.seen = mtime, set()
        self.seen.add(path)

    def dump(self) -> str:
        return json.dumps({"mtime": self.mtime, "seen": sorted(self.seen)})


def drop_config(path: str) -> UrlTableConfig:
    """The ``url_tables`` config of a dropped file: its download options come from the inbox's
    ``img2ds.toml``, overridden by the file's own ``<name>.img2ds.toml`` (e.g. ``caption_col =
    "caption"``); both are optional. Every option is checked here, by the config's own types and the
    engine's rules, so that a bad one is refused before a run starts: ConfigError naming the
    settings file and the option."""
    folder, name = path.rsplit("/", 1) if "/" in path else (".", path)
    settings: dict[str, Any] = {}
    origin: dict[str, str] = {}  # option -> the settings file it came from
    for candidate in (f"{folder}/{INBOX_SETTINGS}", f"{folder}/{table_key(name)}{SETTINGS_SUFFIX}"):
        fs, p = fsspec.core.url_to_fs(candidate)
        if not fs.exists(p):
            continue
        with fs.open(p, "rb") as f:
            try:
                found = tomllib.load(f)
            except tomllib.TOMLDecodeError as err:
                raise ConfigError(f"{candidate}: not valid TOML: {err}") from None
        unknown = sorted(set(found) - set(DownloadConfig.model_fields))
        if unknown:
            raise ConfigError(f"{candidate}: unknown option(s) {unknown}")
        settings.update(found)
        origin.update(dict.fromkeys(found, candidate))
    try:
        config = UrlTableConfig(**settings, source=path)
    except pydantic.ValidationError as err:
        raise config_error(err, origin) from None
    try:
        config.to_settings()
    except ConfigError as err:  # the message starts with the option's name
        option = str(err).split(":", 1)[0]
        raise ConfigError(f"{origin.get(option, path)}: {err}") from None
    return config


def is_url_file(name: str) -> bool:
    """Whether a file of the inbox is a URL file: not hidden or temporary (``.x``, ``_x``), and named
    after an input format (settings files and anything else are left alone)."""
    return bool(name) and not name.startswith((".", "_")) and input_format_of(name) is not None


@dataclass(frozen=True, slots=True)
class S3Object:
    key: str
    last_modified: float  # Unix time


@dataclass
class S3DropCursor:
    """How far an S3 inbox has been read: the cursor of ``s3_url_drop_sensor``.

    S3 lists keys in lexical order, so ``after``, the greatest key listed so far, lets a tick ask only
    for keys never listed before (ListObjectsV2 with StartAfter): a single request when nothing is new,
    however many files the inbox holds. Two kinds of new file are not in those listings: a key that
    sorts before ``after`` (``a.csv`` dropped after ``b.csv``) and a file uploaded again under a key
    already listed. Every few ticks a full listing picks them up by their LastModified, as the folder
    sensor's DropCursor does with mtimes. A multipart upload's LastModified is when the upload
    *started*, so a file can become visible with a LastModified older than files picked up meanwhile:
    the files picked up within ``window`` seconds of the newest one are remembered (``recent``), and a
    file that recent and not remembered (with that LastModified) counts as new.
    """

    inbox: str = ""  # the prefix this cursor is about: a cursor of another inbox starts over
    after: str = ""
    mtime: float = 0.0  # newest LastModified picked up
    recent: dict[str, float] = field(default_factory=dict)  # key -> LastModified picked up
    incremental: int = 0  # listings since the last full one

    @classmethod
    def parse(cls, raw: str | None, inbox: str) -> S3DropCursor:
        data = json.loads(raw) if raw else {}
        if data.get("inbox") != inbox:
            return cls(inbox=inbox)
        return cls(inbox, data["after"], float(data["mtime"]), dict(data["recent"]), int(data["incremental"]))

    def full_listing_due(self, every: int) -> bool:
        """A full listing on the first tick, then on every ``every``-th tick."""
        return not self.after or self.incremental >= every - 1

    def is_new(self, obj: S3Object, window: float) -> bool:
        if obj.key > self.after:  # never listed before
            return True
        if obj.last_modified > self.mtime:
            return True
        return obj.last_modified >= self.mtime - window and self.recent.get(obj.key) != obj.last_modified

    def advance(self, obj: S3Object) -> None:
        self.mtime = max(self.mtime, obj.last_modified)
        self.recent[obj.key] = obj.last_modified

    def listed(self, last_key: str, full: bool, window: float) -> None:
        """Record a tick's listing, which went up to ``last_key`` (empty when it listed nothing), once
        the new files in it have been advanced over."""
        self.after = max(self.after, last_key)
        self.incremental = 0 if full else self.incremental + 1
        self.recent = {k: t for k, t in self.recent.items() if t >= self.mtime - window}

    def dump(self) -> str:
        return json.dumps(
            {
                "inbox": self.inbox,
                "after": self.after,
                "mtime": self.mtime,
                "recent": dict(sorted(self.recent.items())),
                "incremental": self.incremental,
            }
        )


def split_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ``("bucket", "some/prefix/")``: the prefix is a folder."""
    if not url.startswith("s3://"):
        raise ConfigError(f"{url}: not an s3:// URL (expected s3://bucket/prefix/)")
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    if not bucket:
        raise ConfigError(f"{url}: no bucket name (expected s3://bucket/prefix/)")
    prefix = prefix.strip("/")
    return bucket, f"{prefix}/" if prefix else ""


def list_s3_inbox(client: Any, bucket: str, prefix: str, start_after: str) -> tuple[list[S3Object], str]:
    """The URL files directly under ``prefix`` whose keys sort after ``start_after`` (all of them when
    it is empty), and the last key listed. ``client`` is a boto3 S3 client."""
    params = {"Bucket": bucket, "Prefix": prefix, "Delimiter": "/"}
    if start_after:
        params["StartAfter"] = start_after
    found: list[S3Object] = []
    last_key = ""
    for page in client.get_paginator("list_objects_v2").paginate(**params):
        for obj in page.get("Contents", []):
            key = obj["Key"]
            last_key = max(last_key, key)
            if is_url_file(key[len(prefix) :]):
                found.append(S3Object(key, obj["LastModified"].timestamp()))
    return found, last_key
