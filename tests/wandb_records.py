"""Read the metric keys an offline W&B run logged, straight from its ``run-*.wandb`` file.

wandb 0.31 writes offline runs from its Go core and no longer ships a Python reader. The file is a
LevelDB-style log: a 7-byte header, then 32 KiB blocks of records, each with a 7-byte header
(crc32, length, type) and a chunk of a serialised ``wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
FILE_HEADER = 7
RECORD_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _payloads(data: bytes) -> list[bytes]:
    assert data[:4] == b":W&B", "not a wandb run file"
    payloads, pending, offset = [], b"", FILE_HEADER
    while offset + RECORD_HEADER <= len(data):
        room = BLOCK - offset % BLOCK
        if room < RECORD_HEADER:  # the writer pads block tails too small for a header
            offset += room
            continue
        _, length, kind = struct.unpack("<IHB", data[offset:offset + RECORD_HEADER])
        chunk = data[offset + RECORD_HEADER:offset + RECORD_HEADER + length]
        offset += RECORD_HEADER + length
        if kind == FULL:
            payloads.append(chunk)
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            payloads.append(pending + chunk)
        else:
            break  # zero padding at the end of the last block
    return payloads


def history_keys(run_file: Path) -> set[str]:
    """Every metric key that appears in the run's history records."""
    keys: set[str] = set()
    for payload in _payloads(run_file.read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") == "history":
            keys.update(item.key or "/".join(item.nested_key) for item in record.history.item)
    return keys
