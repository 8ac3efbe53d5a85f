"""The last good map on disk, for a warm start while the server is unreachable.

File: ``b"CMSNAP01"``, an 8-byte little-endian xxh3_64 of the body, then the body: msgpack
``{"epoch", "revision", "written_ns", "services": [service record payloads]}`` (the region's
service encoding, so both are validated by one decoder). Written to a temporary file, fsynced and
renamed, so a crash leaves the old snapshot or the new one, never a torn one.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import msgpack
import xxhash

from clustermap.errors import CorruptRegion
from clustermap.model import Service
from clustermap.region.layout import decode_service, encode_service

__all__ = ["Snapshot", "SnapshotError", "load", "save"]

_MAGIC = b"CMSNAP01"


class SnapshotError(Exception):
    """The snapshot file is unreadable; the sidecar starts without it."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    epoch: str
    revision: int
    written_ns: int
    services: tuple[Service, ...]


def save(path: Path, services: Iterable[Service], epoch: str, revision: int) -> None:
    body = msgpack.packb(
        {
            "epoch": epoch,
            "revision": revision,
            "written_ns": time.time_ns(),
            "services": [encode_service(s) for s in services],
        }
    )
    data = _MAGIC + struct.pack("<Q", xxhash.xxh3_64_intdigest(body)) + body
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load(path: Path) -> Snapshot:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SnapshotError(f"{path}: {exc.strerror}") from None
    if len(data) < 16 or data[:8] != _MAGIC:
        raise SnapshotError(f"{path}: not a ClusterMap snapshot")
    body = data[16:]
    if struct.unpack("<Q", data[8:16])[0] != xxhash.xxh3_64_intdigest(body):
        raise SnapshotError(f"{path}: checksum mismatch (truncated or damaged)")
    try:
        doc = msgpack.unpackb(body)
        services = tuple(decode_service(raw) for raw in doc["services"])
        return Snapshot(str(doc["epoch"]), int(doc["revision"]), int(doc["written_ns"]), services)
    except (CorruptRegion, KeyError, TypeError, ValueError) as exc:
        raise SnapshotError(f"{path}: malformed snapshot: {exc}") from None
