"""What an offline W&B run wrote: the records of its .wandb transaction log (tests of logger=wandb
and of src.report --wandb)."""

from __future__ import annotations

import struct
import time
from collections.abc import Iterator
from pathlib import Path

from wandb.proto.wandb_internal_pb2 import Record


def finished_records(path: Path, timeout_s: float = 60) -> list[Record]:
    """The records of a finished run. wandb's service process may still be writing the file when
    `finish()` returns (seen: only the 7-byte header, a moment later the whole log), so wait for
    the record that closes the run."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = list(read_records(path))
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def read_records(path: Path) -> Iterator[Record]:
    """The records of a .wandb transaction log: a ':W&B' header, then LevelDB log blocks of 32 KiB
    whose chunks (4-byte checksum, 2-byte length, 1-byte type) carry serialised protobuf Records."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, header = 32768, 7
    pos, pending = header, b""
    while pos + header <= len(data):
        if block - pos % block < header:  # a block's tail too short for a chunk is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + header])
        pending += data[pos + header : pos + header + length]
        pos += header + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = Record()
            record.ParseFromString(pending)
            yield record
            pending = b""
