"""Errors that end a node's run (each message says why, and what to change)."""


class NodeFailed(RuntimeError):
    """The run cannot go on (a step timed out, replicas cannot agree); the message says why."""
