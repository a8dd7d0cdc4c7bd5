"""The code version nodes announce: peers of another protocol version are refused by name."""

VERSION = "0.7.0"  # 0.7: records vouch for state digests; joiners check downloads (#10 C2)
