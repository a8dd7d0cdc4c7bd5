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
