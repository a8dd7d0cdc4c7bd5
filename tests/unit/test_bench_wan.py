"""The bandwidth benchmark's arithmetic (ratios, the verdict, the table) on fixed rows, and its
argument checks. Its cells are `resbm simulate --link` swarms (tested in
tests/swarm/test_wan_swarm.py); a whole cell is too slow for the suite and runs in the bench."""

from __future__ import annotations

import argparse

import pytest

from resbm.bench import bandwidth

SETTING = {
    "stages": 4, "d_model": 256, "n_layers": 4, "microbatches": 4, "batch_size": 16,
    "seq_len": 128, "wire_codec": "bf16", "warmup": 4, "steps": 14,
}  # fmt: skip


def row(c: int, link: str, tok_s: float, transfer: float = 0.0) -> dict:
    latency = 0.0 if link == "none" else 0.24
    return {
        "compression": c, "link": link, "tokens_per_s": tok_s, "s_per_step": 8192 / tok_s,
        "compute_s_per_step": 1.0, "bytes_per_boundary_each_way": 1000.0,
        "analytic_transfer_s": transfer, "analytic_latency_s": latency,
    }  # fmt: skip


def test_ratios_are_to_the_same_compressions_fast_link_and_loopback():
    rows = [row(128, "none", 100), row(128, "1000mbit:40ms", 80), row(128, "10mbit:40ms", 76)]
    rows += [row(1, "1000mbit:40ms", 90), row(1, "10mbit:40ms", 30)]
    bandwidth.ratios(rows)
    by = {(r["compression"], r["link"]): r for r in rows}
    assert by[(128, "10mbit:40ms")]["vs_fast_link"] == pytest.approx(0.95)
    assert by[(128, "10mbit:40ms")]["vs_none"] == pytest.approx(0.76)
    assert by[(1, "10mbit:40ms")]["vs_fast_link"] == pytest.approx(1 / 3)
    assert by[(1, "10mbit:40ms")]["vs_none"] is None  # no loopback run of that compression
    words = " ".join(bandwidth.verdict(rows))
    assert "keeps 95.0%" in words and "meets the 90% goal" in words
    assert "loses 20.0%" in words and "latency, not bandwidth" in words
    assert "2.53x faster" in words
    table = bandwidth.table(rows, SETTING)
    assert "4 microbatches of 16x128 tokens" in table and "95.0%" in table


def test_missing_the_goal_is_said():
    rows = [row(128, "1000mbit:40ms", 100), row(128, "10mbit:40ms", 80)]
    bandwidth.ratios(rows)
    assert "misses the 90% goal" in bandwidth.verdict(rows)[0]


def test_a_bad_link_is_refused_before_any_swarm_starts(capsys):
    parser = argparse.ArgumentParser()
    bandwidth.add_parser(parser.add_subparsers())
    args = parser.parse_args(["bandwidth", "--links", "none", "10MBps:40ms"])  # bytes
    assert args.handler(args) == 2
    assert "--link '10MBps:40ms'" in capsys.readouterr().err
