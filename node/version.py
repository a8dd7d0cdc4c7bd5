"""The code version nodes announce: peers of another protocol version are refused by name."""

VERSION = "0.9.0"  # 0.9: stage 0's split in the state digest replicas vouch for (#10 C2)
