"""A volunteer's node talks back: the 30 s progress line and the summary on exit (found by hand:
"step 333: 1 counted here, 0 pending, upstream done 0/1" every 30 s, and nothing at exit)."""

from __future__ import annotations

import pytest

from node.report import Progress, exit_summary, progress_line

pytestmark = pytest.mark.unit


def test_the_progress_line_says_step_loss_rate_and_this_nodes_work():
    line = progress_line(
        1, 333, 800, 666, 2048, Progress(at=0.0, counted=600), now=30.0, loss=1.9123
    )
    # 66 microbatches of 2048 tokens in 30 s
    assert (
        line == "stage 1: step 333/800, loss 1.912, 4.5k tokens/s, 666 microbatches computed here"
    )
    stuck = progress_line(0, 27, 120, 54, 2048, Progress(30.0, 54), 60.0, waiting="paused: x")
    assert stuck.endswith("0 tokens/s, 54 microbatches computed here; paused: x")


def test_the_exit_summary_says_where_why_and_what_was_done():
    stats = {"counted": 240, "recomputed": 3}
    done = exit_summary(2, 120, 120, 0, stats, 3_400_000, 0, "/state/s/checkpoints")
    assert done == (
        "stage 2: finished at step 120/120: 240 microbatches computed here (3 recomputed for "
        "others), 3.4MB sent, 0 error(s); checkpoint in /state/s/checkpoints"
    )
    assert exit_summary(0, 52, 120, 0, {}, 0, 0, None).startswith("stage 0: left at step 52/120")
    assert "failed (exit 1) at step 7/120" in exit_summary(0, 7, 120, 1, {}, 10, 2, None)
