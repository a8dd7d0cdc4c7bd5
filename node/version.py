"""The code version nodes announce: peers of another protocol version are refused by name."""

VERSION = "0.6.0"
