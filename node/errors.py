"""Errors that end a node's run (each message says why, and what to change)."""


class NodeFailed(RuntimeError):
    """The run cannot go on (a step timed out, replicas cannot agree); the message says why."""


class Unreachable(RuntimeError):
    """The swarm (its coordinator, its DHT) did not answer now: a restart later may work. Exits
    with EXIT_TEMPFAIL, which service managers restart, unlike a configuration error (exit 2)."""


EXIT_CONFIG = 2  # the configuration cannot work: fix it, restarting will not help
EXIT_TEMPFAIL = 75  # sysexits' EX_TEMPFAIL: try again later
