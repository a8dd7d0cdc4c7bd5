"""Fault injection for tests and `resbm simulate --chaos`, outside the protocol: the daemon
passes it the machine's Trace effects (a point of the schedule reached) and its outgoing
messages, and it kills this node's process group there, or garbles one activation, as the
hidden `fail_at_step` / `fail_phase` settings ask. With neither set it does nothing.
"""

from __future__ import annotations

import logging
import os
import signal

from node.wire.messages import Forward

log = logging.getLogger(__name__)


class Chaos:
    def __init__(self, cfg, events, node_id: str):
        self.at, self.phase = cfg.fail_at_step, cfg.fail_phase
        self.stage, self.events, self.node_id = cfg.stage, events, node_id
        self.garbled = False

    def reached(self, phase: str, step: int) -> None:
        """SIGKILL this node's whole process group at the first `phase` at or after the step."""
        if self.at is not None and step >= self.at and self.phase == phase:
            log.warning(
                "stage %d: fault injection: SIGKILL at step %d (%s)", self.stage, step, phase
            )
            self.events.write("killed", stage=self.stage, node=self.node_id, step=step)
            self.events.close()
            os.killpg(os.getpgid(0), signal.SIGKILL)

    def outgoing(self, msg, step: int):
        """`garbage`: one finite but absurd activation (x1e6), once, as a broken GPU would."""
        if self.at is None or self.phase != "garbage" or self.garbled:
            return msg
        if not isinstance(msg, Forward) or msg.replay_of or step < self.at:
            return msg
        self.garbled = True
        log.warning("stage %d: fault injection: sending garbage at step %d", self.stage, step)
        self.events.write("garbage", stage=self.stage, node=self.node_id, step=step)
        return Forward(msg.id, msg.z * 1e6, msg.offsets, msg.data_fingerprint)
