"""The code version nodes announce: peers of another protocol version are refused by name."""

# 0.9: round info signed whole, with a commitment to the vector; digests signed (#10 C1);
# stage 0's split in the state digest replicas vouch for (#10 C2)
VERSION = "0.9.0"
