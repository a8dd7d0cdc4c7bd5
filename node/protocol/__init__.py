"""A stage node's protocol, sans I/O: one state, events in, effects out.

`StageMachine.handle(event, now)` is the only way a stage's state changes. It is synchronous and
touches no socket, no event loop, no DHT and no clock: the daemon (node/daemon.py) feeds it
events from links, the averager and the DHT, and carries out the effects it returns; the
deterministic harness (node/protocol/harness.py) feeds it the same events from a seeded fake
network. See docs/architecture.md for the walk of one microbatch.
"""
