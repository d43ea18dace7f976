"""Reading an offline W&B run back (for tests): the records of its ``run-*.wandb`` file and the
history rows they hold."""

from __future__ import annotations

import json
import struct
from pathlib import Path


def read_wandb_records(path: Path) -> list:
    """Records of a ``run-*.wandb`` file: a ':W&B' header, then LevelDB-log framing (32 KiB blocks
    of chunks: crc32 u32, length u16, type u8 = full 1 / first 2 / middle 3 / last 4)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buffer, records = 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        if kind == 0 and length == 0:
            break
        buffer += data[pos : pos + length]
        pos += length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buffer)
            records.append(record)
            buffer = b""
    return records


def history_rows(records) -> list[dict]:
    rows = []
    for record in records:
        if record.WhichOneof("record_type") == "history":
            row: dict = {}
            for item in record.history.item:
                keys = list(item.nested_key) or [item.key]
                node = row
                for key in keys[:-1]:
                    node = node.setdefault(key, {})
                node[keys[-1]] = json.loads(item.value_json)
            rows.append(row)
    return rows


def wait_for_history(path: Path, keys: set[str], timeout_s: float = 30.0) -> tuple[list, list[dict]]:
    """``(records, history rows)`` of a run file once its rows hold every key in ``keys``: on a
    loaded machine the file can trail ``run.finish()`` (W&B's service writes it), so it is read
    again, once a second, for up to ``timeout_s``; the last read is returned either way, for the
    caller's assertions to name what is missing."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            records = read_wandb_records(path)
            rows = history_rows(records)
        except Exception:  # the file or its last record is still being written
            if time.monotonic() > deadline:
                raise
            records, rows = [], []
        if keys <= {key for row in rows for key in row} or time.monotonic() > deadline:
            return records, rows
        time.sleep(1.0)
