"""Read an offline W&B run file (run-*.wandb): a LevelDB-style log of protobuf `Record`s.

File: a 7-byte header (":W&B", 0xBEE1, version), then 32 KiB blocks of chunks, each with a 4-byte
checksum, a 2-byte little-endian length, a 1-byte type (1 full, 2 first, 3 middle, 4 last) and the data.
"""

import struct
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7
CHUNK_HEADER = 7


def read_records(path: Path):
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", "not a W&B run file"
    position, pending = HEADER, b""
    while position + CHUNK_HEADER <= len(data):
        left_in_block = BLOCK - position % BLOCK
        if left_in_block < CHUNK_HEADER:  # block trailer padding
            position += left_in_block
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[position : position + CHUNK_HEADER])
        if kind == 0 and length == 0:
            break
        chunk = data[position + CHUNK_HEADER : position + CHUNK_HEADER + length]
        position += CHUNK_HEADER + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def run_content(path: Path) -> tuple[dict, set]:
    """(config keys and JSON values, every metric key logged in history)."""
    config, metrics = {}, set()
    for record in read_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "config":
            config.update({item.key: item.value_json for item in record.config.update})
        elif kind == "history":
            metrics.update(item.key or "/".join(item.nested_key) for item in record.history.item)
    return config, metrics
