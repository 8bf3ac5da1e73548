"""Read a W&B offline run file (``run-*.wandb``) back, for tests.

The file is W&B's record log: a 7-byte header (``:W&B``, magic, version), then
32 KiB blocks of records, each ``crc32 (4) | length (2, LE) | type (1)`` and a
payload; type 1 is a whole record, 2/3/4 the first/middle/last piece of one.
Each record is a ``wandb_internal_pb2.Record`` protobuf.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7


def read_records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a W&B run file"
    pos, pieces, records = HEADER, b"", []
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        pos += HEADER
        chunk = data[pos : pos + length]
        pos += length
        if kind == 0 and length == 0:  # zero padding to the block end
            pos += left - HEADER
            continue
        if kind == 1:
            records.append(chunk)
        elif kind == 2:
            pieces = chunk
        elif kind == 3:
            pieces += chunk
        elif kind == 4:
            records.append(pieces + chunk)
    return [pb.Record.FromString(raw) for raw in records]


def finished_records(run_dir: Path, wait: float = 60.0) -> list:
    """The records of the (single) offline run under ``run_dir``, once complete.

    W&B's service process writes the file; on a loaded machine its last blocks
    can land after ``wandb.finish()`` returns, so wait (up to ``wait`` seconds)
    for the run's closing ``exit`` record.
    """
    deadline = time.monotonic() + wait
    while True:
        (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
        records = read_records(path)
        kinds = [r.WhichOneof("record_type") for r in records]
        if "exit" in kinds:
            return records
        if time.monotonic() > deadline:
            raise AssertionError(f"W&B run file never closed; records: {kinds}")
        time.sleep(0.2)


def read_history(run_dir: Path) -> list[dict]:
    """Every ``wandb.log`` row of the (single) offline run under ``run_dir``."""
    rows = []
    for record in finished_records(run_dir):
        if record.WhichOneof("record_type") != "history":
            continue
        row = {}
        for item in record.history.item:
            key = item.key or "/".join(item.nested_key)
            row[key] = json.loads(item.value_json)
        rows.append(row)
    return rows


def read_summary(run_dir: Path) -> dict:
    """The final W&B summary of the (single) offline run under ``run_dir``:
    every ``summary`` update applied in order."""
    summary: dict = {}
    for record in finished_records(run_dir):
        if record.WhichOneof("record_type") != "summary":
            continue
        for item in record.summary.update:
            key = item.key or "/".join(item.nested_key)
            summary[key] = json.loads(item.value_json)
    return summary
