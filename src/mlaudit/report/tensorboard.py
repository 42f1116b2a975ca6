"""Export a run to TensorBoard (``mlaudit runs export ID --format tensorboard``), without TensorBoard.

TensorBoard reads *event files*: a sequence of TFRecords, each ``uint64 length | uint32 masked
CRC-32C(length) | data | uint32 masked CRC-32C(data)`` (little endian), whose data is a serialized
``tensorflow.Event`` protobuf. The few fields written here are encoded by hand:

* ``Event``: ``wall_time`` (1, double), ``step`` (2, int64), ``file_version`` (3, string; the first
  record says ``brain.Event:2``), ``summary`` (5, message);
* ``Summary``: repeated ``value`` (1, message); ``Summary.Value``: ``tag`` (1, string) and
  ``simple_value`` (2, float).

CRC-32C is the Castagnoli polynomial (reflected 0x82F63B78); TFRecord masks it as
``((crc >> 15) | (crc << 17)) + 0xa282ead8`` (mod 2^32). What is exported: every finite numeric metric
of the run at step 0 under ``metrics/<name>`` (dots become slashes) and, per finished trial ``i`` (in
trial order), each numeric trial metric at step ``i`` under ``trials/<name>``.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ..atomic import atomic_path
from ..jsonutil import numeric_leaves

_POLY = 0x82F63B78
_TABLE = []
for _i in range(256):
    _c = _i
    for _ in range(8):
        _c = (_c >> 1) ^ _POLY if _c & 1 else _c >> 1
    _TABLE.append(_c)


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of ``data``; ``crc32c(b"123456789") == 0xE3069283``."""
    crc = 0xFFFFFFFF
    for b in data:
        crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _record(data: bytes) -> bytes:
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc(length)) + data + struct.pack("<I", masked_crc(data))


def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1  # int64 as protobuf sends it (two's complement for negatives)
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def event(wall_time: float, step: int, *, scalars: Iterable[tuple[str, float]] = (),
          file_version: str | None = None) -> bytes:
    """One serialized ``Event`` with ``scalars`` (tag, value) as its summary."""
    msg = bytes([1 << 3 | 1]) + struct.pack("<d", wall_time) + _varint(2 << 3) + _varint(step)
    if file_version is not None:
        msg += _field(3, file_version.encode())
    values = b"".join(_field(1, _field(1, tag.encode()) + bytes([2 << 3 | 5]) + struct.pack("<f", value))
                      for tag, value in scalars)
    if values:
        msg += _field(5, values)
    return msg


def _numeric(d: Mapping[str, Any]) -> list[tuple[str, float]]:
    return [(name.replace(".", "/"), v) for name, v in numeric_leaves(dict(d))]


def write_tensorboard(run: Mapping[str, Any], log_dir: str | Path) -> Path:
    """Write ``run`` (a :meth:`mlaudit.store.RunStore.export` dict) as one event file in ``log_dir``;
    returns the file's path."""
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    now = time.time()
    records = [event(now, 0, file_version="brain.Event:2"),
               event(now, 0, scalars=[(f"metrics/{t}", v) for t, v in _numeric(run.get("metrics", {}))])]
    done = [t for t in run.get("trials", []) if t.get("status") == "done"]
    for i, t in enumerate(done):
        metrics = (t.get("result") or {}).get("metrics", {})
        scalars = [(f"trials/{n}", v) for n, v in _numeric(metrics)]
        if scalars:
            records.append(event(now, i, scalars=scalars))
    path = log_dir / f"events.out.tfevents.{int(now)}.{socket.gethostname() or 'mlaudit'}.mlaudit"
    with atomic_path(path) as tmp:
        tmp.write_bytes(b"".join(_record(r) for r in records))
    return path
