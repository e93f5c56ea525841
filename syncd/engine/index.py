"""The index: what the publisher remembers of each key it published (pure; the page scripts in
`syncd.engine.scripts` do the same in Lua, and tests hold the two to each other).

Per feed, the index is a small hash of metadata, `idx:<feed>` (`level`, `split`, `count`,
`mark`), and buckets `idx:<feed>:<n>`: small hashes that Redis keeps as listpacks, record key
-> value. Buckets grow by linear hashing: a key's bucket is `h mod 2^level`, or
`h mod 2^(level + 1)` when that is below `split`; once the index holds more than
LOAD x buckets keys, bucket `split` is split in two (its keys whose bucket at the next level
differs move to bucket `split + 2^level`) and `split` moves on. Keys only ever move to a
higher bucket, so a sweep over the buckets in order sees every key once.

`h` is the key itself for a decimal number below 10^15 without leading zeros (ServiceTitan's
ids; consecutive ids then fill buckets evenly), else a polynomial hash of its bytes modulo the
prime 4294967291. Both fit a Lua number exactly.

A value is the record's fingerprint (FINGERPRINT_BYTES), one byte of mark (the reconciliation
pass that last saw the key), then, when the version had a timestamp, its packed instant
(`syncd.instants.packed_instant`, 8 bytes) and the fingerprints of up to SAME_INSTANT_KEPT
versions published before it with that same instant, newest first. A typical value is 17
bytes; with a numeric key and about LOAD keys a bucket, about 28 bytes of Redis memory a key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from syncd.instants import PACKED_BYTES
from syncd.servicetitan.page import FINGERPRINT_BYTES

# Keys a bucket holds on average before one is split: unsplit buckets hold up to twice as
# many, which stays under Redis' default `hash-max-listpack-entries` (128).
LOAD = 48

# Fingerprints of earlier versions kept per key while its versions share one timestamp.
SAME_INSTANT_KEPT = 4

# The mark of an index that no reconciliation pass has marked yet.
FIRST_MARK = 1

_NUMBER = re.compile(r"[1-9][0-9]{0,14}", re.ASCII)
_PRIME = 4294967291


def key_hash(key: str) -> int:
    """The bucket hash of a record key (the scripts' `hash`)."""
    if _NUMBER.fullmatch(key):
        return int(key)
    h = 0
    for byte in key.encode():
        h = (h * 257 + byte) % _PRIME
    return h


def bucket(h: int, level: int, split: int) -> int:
    """The bucket of a key hashed to `h`."""
    b = h % (1 << level)
    if b < split:
        b = h % (1 << (level + 1))
    return b


def grown(count: int, level: int, split: int) -> tuple[int, int, list[int]]:
    """The (level, split) for an index of `count` keys, and the buckets split to get there,
    in order: one each time `count` exceeds LOAD x the buckets there are."""
    splits: list[int] = []
    while count > LOAD * ((1 << level) + split):
        splits.append(split)
        split += 1
        if split == 1 << level:
            level, split = level + 1, 0
    return level, split, splits


@dataclass(frozen=True, slots=True)
class Entry:
    """An index value, read."""

    fingerprint: bytes
    mark: int
    instant: bytes  # packed; b"" when the version published had no timestamp
    earlier: tuple[bytes, ...]  # fingerprints published before it at the same instant


def encode(entry: Entry) -> bytes:
    return (
        entry.fingerprint
        + bytes([entry.mark])
        + entry.instant
        + b"".join(entry.earlier[:SAME_INSTANT_KEPT])
    )


def decode(value: bytes) -> Entry:
    fp_end = FINGERPRINT_BYTES
    instant = value[fp_end + 1 : fp_end + 1 + PACKED_BYTES]
    rest = value[fp_end + 1 + PACKED_BYTES :]
    earlier = tuple(rest[i : i + FINGERPRINT_BYTES] for i in range(0, len(rest), FINGERPRINT_BYTES))
    return Entry(value[:fp_end], value[fp_end], instant, earlier)


def older(instant: bytes, fingerprint: bytes, old: bytes) -> bool:
    """Whether a version (its packed instant, not empty, and fingerprint) is older than the one
    an index value describes: an earlier instant, or one of the versions published before it
    at the same instant (the scripts' rule)."""
    start = FINGERPRINT_BYTES + 1
    old_instant = old[start : start + PACKED_BYTES]
    if not old_instant:
        return False
    if instant != old_instant:
        return instant < old_instant
    earlier = old[start + PACKED_BYTES :]
    return any(
        earlier[i : i + FINGERPRINT_BYTES] == fingerprint
        for i in range(0, len(earlier), FINGERPRINT_BYTES)
    )


def precheck(
    olds: list[bytes | None], fps: list[bytes], instants: list[bytes], mark: int
) -> tuple[list[int], int, int]:
    """Which records of a page may change the index, judged against their index values (the
    scripts' rule): indexes to send, and how many are unchanged and stale. A record unchanged
    but for its mark is sent: the script marks it."""
    mark_byte = bytes([mark])
    at = FINGERPRINT_BYTES
    # Most records of a re-export are unchanged: drop those in one comprehension first.
    judged = changed(olds, fps, mark)
    pick: list[int] = []
    stale = 0
    for i in judged:
        old, instant = olds[i], instants[i]
        if (
            old is not None
            and instant
            and old[at : at + 1] == mark_byte
            and older(instant, fps[i], old)
        ):
            stale += 1
        else:
            pick.append(i)
    return pick, len(olds) - len(judged), stale


def changed(olds: list[bytes | None], fps: list[bytes], mark: int) -> list[int]:
    """The records of a page whose index value is not theirs already (fingerprint and mark):
    those `precheck` judges; every other one is unchanged."""
    mark_byte = bytes([mark])
    at = FINGERPRINT_BYTES
    return [
        i
        for i, old in enumerate(olds)
        if old is None or not old.startswith(fps[i]) or old[at : at + 1] != mark_byte
    ]
