"""What a run leaves beside its checkpoints for people and tools to follow: ``metrics.jsonl`` and TensorBoard events.

TensorBoard's writer needs the ``tensorboard`` package (``torch.utils.tensorboard`` and ``tf.summary`` both do),
which the training images do not carry, and importing TensorFlow into a PyTorch process costs seconds and memory.
Scalar events are a tiny, stable format — TFRecord framing (length, masked CRC-32C) around ``Event`` protocol
buffers — so ``EventWriter`` writes them directly; TensorBoard reads the files as it reads its own.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time
from pathlib import Path
from typing import Any


class MetricsLog:
    """JSON lines, one record per logged step or validation. Resuming at step ``s`` drops the records a killed
    run wrote after its last checkpoint, so the file tells one consistent story."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = Path(path)
        if resume_step is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif resume_step is None:
            self.path.write_text("")

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as file:
            file.write(json.dumps(record) + "\n")

    @staticmethod
    def read(path: Path) -> list[dict[str, Any]]:
        return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:  # a length-delimited protobuf field
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


class EventWriter:
    """TensorBoard scalar events in ``directory`` (one ``events.out.tfevents.*`` file per run or resume)."""

    def __init__(self, directory: Path, resume_step: int | None = None):
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}.0"
        self.file = (directory / name).open("ab")
        self._write(_field(3, b"brain.Event:2"), step=0)
        if resume_step is not None:  # SessionLog START at the resume step: TensorBoard drops the orphaned tail
            self._write(_field(7, b"\x08\x01"), step=resume_step)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        summary = b"".join(_field(1, _field(1, tag.encode()) + b"\x15" + struct.pack("<f", float(value)))
                           for tag, value in values.items() if value is not None)
        self._write(_field(5, summary), step)

    def _write(self, body: bytes, step: int) -> None:
        event = b"\x09" + struct.pack("<d", time.time()) + b"\x10" + _varint(step) + body
        header = struct.pack("<Q", len(event))
        self.file.write(header + struct.pack("<I", _masked_crc(header)) + event + struct.pack("<I", _masked_crc(event)))

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        self.file.close()
