"""The one exception the data layer raises: it always names the shard (and the sample key)."""
from __future__ import annotations

from typing import NamedTuple


class DataError(Exception):
    """Bad or missing data: a corrupt shard, a checksum mismatch, a sample without a label."""


class SkipRecord(NamedTuple):
    """One thing the loader skipped under `on_bad_sample="skip"`: never dropped silently."""

    shard: str
    key: str | None  # None when the whole (rest of a) shard was unreadable
    reason: str
