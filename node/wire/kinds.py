"""Names of the wire codecs, importable without torch or protobuf (configs and the CLI use it)."""

from __future__ import annotations

from enum import StrEnum


class WireCodec(StrEnum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"
    int8 = "int8"  # one scale per tensor
    int8_channel = "int8-channel"  # one scale per channel (last dim)
    int4_channel = "int4-channel"  # [-7, 7], one scale per channel, two values a byte


# microbatches per step, at most: a peer's notice naming more ids is refused at decode (a million
# ids took 40 MB of a node's memory: #10 H5)
MAX_MICROBATCHES = 4096

# what a node id may be: it names the node in logs, metrics, DHT keys and every peer's tables, so
# a peer's Hello with anything else (newlines, escapes, 200 characters) is refused (#10 L)
NODE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@+=-]{0,127}$"
