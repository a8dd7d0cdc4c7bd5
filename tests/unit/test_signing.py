"""Join and Leave signatures (coordinator/signing.py): what each one covers, the clock window,
and the replay table."""

from __future__ import annotations

from dataclasses import replace

from common.identity import Identity
from coordinator.messages import (
    JoinRequest,
    LeaveRequest,
    join_request_from_pb,
    join_request_to_pb,
    leave_request_from_pb,
    leave_request_to_pb,
)
from coordinator.signing import MAX_SKEW_S, Replays, check, sign

ME = Identity.generate()
JOIN = JoinRequest(ME.node_id, "s", "0.5.0", "0123456789abcdef", 1.5, -1, {"seed": 0})


def test_a_signed_request_survives_the_wire_and_covers_every_field():
    signed = sign(JOIN, "s", ME, now=1000.0)
    back = join_request_from_pb(join_request_to_pb(signed))
    assert check(back, "s", now=1000.0) is None
    for change in (
        dict(throughput=9.0), dict(wanted_stage=1), dict(settings={"seed": 1}),
        dict(fingerprint="f" * 16), dict(version="0.5.1"),
    ):  # fmt: skip
        assert "did not make" in check(replace(back, **change), "s", now=1000.0), change
    assert "did not make" in check(back, "other", now=1000.0)  # another swarm's coordinator
    leave = sign(LeaveRequest(ME.node_id, 1), "s", ME, now=1000.0)
    back = leave_request_from_pb(leave_request_to_pb(leave), 3)
    assert check(back, "s", now=1000.0) is None
    assert "did not make" in check(replace(back, stage=0), "s", now=1000.0)


def test_the_clock_window_and_a_missing_signature():
    signed = sign(JOIN, "s", ME, now=1000.0)
    assert check(signed, "s", now=1000.0 + MAX_SKEW_S) is None
    assert "clock" in check(signed, "s", now=1000.0 + MAX_SKEW_S + 1)
    nan = replace(signed, signed=replace(signed.signed, signed_at=float("nan")))
    assert "clock" in check(nan, "s", now=1000.0)
    assert "did not sign" in check(JOIN, "s")


def test_replays_refuse_older_requests_take_repeats_and_stay_bounded():
    r = Replays(size=2)
    first, second = (sign(JOIN, "s", ME, now=t) for t in (1000.0, 1001.0))
    r.take(second)
    assert r.stale(second, now=1001.0) is None  # the same request again: a client's retry
    assert "a replay" in r.stale(first, now=1001.0)
    others = [Identity.generate() for _ in range(2)]
    r.take(sign(replace(JOIN, node_id=others[0].node_id), "s", others[0], now=1001.0))
    # full of recent entries: a new node is refused, no known node is forgotten (forgetting
    # let a flood of fresh keys make a captured request replay: review)
    late = sign(replace(JOIN, node_id=others[1].node_id), "s", others[1], now=1002.0)
    assert "its limit" in r.stale(late, now=1002.0)
    assert "a replay" in r.stale(first, now=1002.0)
    # entries older than the clock window go: the request they guard is refused by the clock
    assert r.stale(late, now=1001.0 + MAX_SKEW_S + 1) is None
