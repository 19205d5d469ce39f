"""The inbox's bookkeeping: which dropped files are new, and their optional settings files."""

from __future__ import annotations

import json
import tomllib
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import fsspec

from ..engine.sources import table_key
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


def inbox_settings(path: str, known: Collection[str]) -> dict[str, Any]:
    """Download options for a dropped file: the inbox's ``img2ds.toml``, overridden by the file's own
    ``<name>.img2ds.toml`` (e.g. ``caption_col = "caption"``). Both are optional; an option that is
    not in ``known`` is an error naming the settings file."""
    folder, name = path.rsplit("/", 1) if "/" in path else (".", path)
    settings: dict[str, Any] = {}
    for candidate in (f"{folder}/{INBOX_SETTINGS}", f"{folder}/{table_key(name)}{SETTINGS_SUFFIX}"):
        fs, p = fsspec.core.url_to_fs(candidate)
        if not fs.exists(p):
            continue
        with fs.open(p, "rb") as f:
            try:
                found = tomllib.load(f)
            except tomllib.TOMLDecodeError as err:
                raise ConfigError(f"{candidate}: not valid TOML: {err}") from None
        unknown = sorted(set(found) - set(known))
        if unknown:
            raise ConfigError(f"{candidate}: unknown option(s) {unknown}")
        settings.update(found)
    return settings
