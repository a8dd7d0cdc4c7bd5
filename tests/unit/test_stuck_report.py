"""A node whose loop stops turning logs where it is (common/process.py): every thread's stack and
what each asyncio task awaits, so that a hang seen once in a run of the suite shows its cause
the next time."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from common.process import report_if_stuck

pytestmark = pytest.mark.unit


async def test_a_loop_that_does_not_turn_is_reported_with_what_it_awaits(caplog):
    never = asyncio.Event()

    async def waits_for_a_lost_answer():
        await never.wait()

    stuck = asyncio.ensure_future(waits_for_a_lost_answer())
    log = logging.getLogger("test.stacks")
    since = time.monotonic()
    try:
        with caplog.at_level(logging.WARNING, logger="test.stacks"):
            assert await report_if_stuck(lambda: since - 1, since, 0.01, log, "stage 1")
        text = caplog.text
        assert "stage 1, and the loop has not turned" in text
        assert "waits_for_a_lost_answer" in text  # the coroutine and the line it waits on
        assert "thread MainThread" in text
        caplog.clear()
        # a loop that turned since: nothing said
        assert not await report_if_stuck(lambda: since + 1, since, 0.01, log, "stage 1")
        assert caplog.text == ""
    finally:
        stuck.cancel()
