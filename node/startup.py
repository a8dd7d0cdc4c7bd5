"""A node's start: where its stage's state comes from (a replica's download, a checkpoint, or
the seed), decided by membership (node/membership.py), and put into the machine before it
starts (`StageMachine.place` / `load_state`). The daemon calls `initial_sync` once.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from node import checkpoint
from node.effects import Carrier


async def initial_sync(carrier: Carrier, adopt_wait_s: float, stopping: asyncio.Event) -> None:
    machine, membership, averager = carrier.machine, carrier.membership, carrier.averager

    async def try_download() -> bool:
        machine.place(synced=False)
        if averager is None:
            return False
        averager.share_state(False)
        await membership.announce()
        got = await membership.download(averager, carrier.rounds)
        if got is None:
            return False
        took, effects = await carrier.on_compute(machine.load_state, *got, time.monotonic())
        await carrier.carry(effects)
        return took

    async def load_checkpoint(path: Path) -> int:
        def load() -> int:
            with machine.core.lock:
                return checkpoint.load_stage(path, machine.core.runtime)

        return await carrier.on_compute(load)

    placed = await membership.initial_sync(try_download, load_checkpoint, stopping)
    if placed.downloaded or not membership.dynamic:
        return
    hold = time.monotonic() + adopt_wait_s if placed.hold else None
    machine.place(placed.synced, placed.group0, placed.step, hold)
    if placed.step is not None:
        s = machine.state
        carrier.events.write(
            "resumed", stage=machine.core.k, node=s.node_id, step=s.step,
            checkpoint=placed.checkpoint,
        )  # fmt: skip
    if machine.state.synced and averager is not None:
        averager.share_state(True)
    await membership.announce()
