"""The code version nodes announce: peers of another protocol version are refused by name."""

VERSION = "0.8.0"  # 0.8: chunks of at most 128 KiB, what every node reads (#10 H5)
