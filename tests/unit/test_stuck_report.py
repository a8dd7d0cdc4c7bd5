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


async def test_a_loop_that_does_not_turn_is_reported_once_with_what_it_awaits(caplog):
    never = asyncio.Event()

    async def waits_for_a_lost_answer():
        await never.wait()

    stuck = asyncio.ensure_future(waits_for_a_lost_answer())
    log = logging.getLogger("test.stacks")
    stalled = time.monotonic() - 1
    try:
        with caplog.at_level(logging.WARNING, logger="test.stacks"):
            # three checks of one stall: said once
            assert await report_if_stuck(lambda: stalled, 0.01, log, "stage 1", checks=3) == 1
        text = caplog.text
        assert "stage 1, and the loop has not turned for 1 s" in text
        assert "waits_for_a_lost_answer" in text  # the coroutine and the line it waits on
        assert "thread MainThread" in text
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="test.stacks"):
            assert await report_if_stuck(lambda: None, 0.01, log, "stage 1", checks=1) == 1
        assert "stage 1, and the loop has not started" in caplog.text
        caplog.clear()
        # a loop that keeps turning: nothing said
        turning = lambda: time.monotonic()  # noqa: E731
        assert await report_if_stuck(turning, 0.01, log, "stage 1", checks=3) == 0
        assert caplog.text == ""
    finally:
        stuck.cancel()
