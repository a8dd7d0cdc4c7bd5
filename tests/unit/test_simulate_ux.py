"""What `resbm simulate`, `train`, `sample` and `--link` tell the user: the start lines and the
kept default workdir, the summary's end (checkpoints and a `resbm sample` line), Ctrl-C as a stop
(exit 130, no FAILED), no averaging line with one replica, `val=-` before the first eval, tokens
streamed as sampled, and the link rate units. A real Ctrl-C on a real swarm:
tests/swarm/test_simulate_ux.py."""

from __future__ import annotations

import argparse
import io
import re

import pytest

from node.config import TrainConfig
from node.tokenizer import ByteTokenizer
from resbm import simulate
from resbm.cli import main
from resbm.simulate import SimulateConfig, Swarm, print_summary
from resbm.wan import LinkSpec

pytestmark = pytest.mark.unit

TINY = {"d_model": 64, "n_heads": 2, "n_layers": 2, "n_stages": 2, "seq_len": 32, "compression": 16}


def summary(**over) -> dict:
    r = {
        "ok": True, "error": None, "stopped": False, "workdir": "w", "has_checkpoint": True,
        "steps": 6, "train_loss": 4.7, "val_loss": 4.6, "tokens_per_s": 1000.0, "d_model": 64,
        "boundary_dim": 4, "compression": 16, "wire_codec": "bf16", "wire_bytes_forward": 10,
        "wire_bytes_backward": 10, "wire_bytes_per_step": 3.0, "wire_compression_vs_bf16": 15.8,
        "stages": 2, "replicas": 1, "link": None, "nodes_killed": 0, "rejoins": 0,
        "microbatches_recomputed": 0, "microbatches_lost": 0, "averaging_s_per_round": 0.0,
        "checkpoint_dir": "w/ckpt",
        "nodes": [{"name": "node0", "stage": 0, "log": "/nonexistent/node0.log"}],
    }  # fmt: skip
    return {**r, **over}


def printed(r: dict) -> str:
    out = io.StringIO()
    print_summary(r, out)
    return out.getvalue()


# ---- the summary --------------------------------------------------------------------------
def test_summary_ends_with_the_checkpoints_and_a_sample_line():
    lines = printed(summary(checkpoint_dir="my run/ckpt")).splitlines()
    assert re.fullmatch(r"checkpoints\s+my run/ckpt", lines[-2])
    assert lines[-1].endswith("resbm sample --checkpoint-dir 'my run/ckpt' --prompt 'ROMEO:'")


def test_no_averaging_line_with_one_replica():
    assert "averaging per round" not in printed(summary(replicas=1))
    text = printed(summary(replicas=2, averaging_s_per_round=1.16))
    assert re.search(r"averaging per round\s+1\.160 s", text)


def test_a_stopped_run_is_no_failure():
    text = printed(summary(ok=False, stopped=True, steps=37, val_loss=None))
    assert "FAILED" not in text and "--- node0" not in text  # no logs as if it crashed
    assert re.search(r"status\s+stopped \(Ctrl-C\)", text)
    assert "stopped at step 37; checkpoints in w/ckpt" in text
    assert text.splitlines()[-1].endswith("resbm sample --checkpoint-dir w/ckpt --prompt 'ROMEO:'")


def test_a_failed_run_still_says_failed_and_shows_logs():
    text = printed(summary(ok=False, error="node1 exit 1", has_checkpoint=False))
    assert "FAILED: node1 exit 1" in text and "--- node0 (stage 0) log" in text
    assert "(none written)" in text and "resbm sample" not in text


# ---- main: start lines, default workdir, exit status ---------------------------------------
def sim_args(*flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    simulate.add_parser(parser.add_subparsers())
    return parser.parse_args(["simulate", *flags])


@pytest.mark.parametrize(("stopped", "ok", "code"), [(False, True, 0), (True, False, 130)])
def test_main_says_where_and_what_at_once_and_exits_by_outcome(
    stopped, ok, code, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    seen = {}

    def fake_run(self, progress=True, overrides=None):
        seen["at_start"] = capsys.readouterr().err  # printed before any process starts
        seen["workdir"] = self.workdir
        return summary(ok=ok, stopped=stopped, checkpoint_dir=str(self.ckpt), steps=3)

    monkeypatch.setattr(Swarm, "run", fake_run)
    assert simulate.main(sim_args("--stages", "2", "--replicas", "2", "--no-progress")) == code
    assert "starting coordinator + 4 nodes..." in seen["at_start"]
    workdir = seen["workdir"]
    assert re.fullmatch(r"resbm-sim-\d{8}-\d{6}", str(workdir))
    assert f"logs and checkpoints in {workdir}/ (kept" in seen["at_start"]
    assert (tmp_path / workdir).is_dir()  # the launcher made it; nothing deletes it
    out = capsys.readouterr().out
    assert f"resbm sample --checkpoint-dir {workdir}/ckpt" in out
    assert ("stopped at step 3; checkpoints in" in out) == stopped


def test_default_workdirs_do_not_collide(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = simulate.default_workdir(0.0)
    first.mkdir()
    second = simulate.default_workdir(0.0)
    assert second != first and str(second).startswith(str(first))


def test_ctrl_c_during_start_up_is_a_stop_not_a_failure(tmp_path, monkeypatch):
    cfg = SimulateConfig(model=TINY, steps=3, workdir=tmp_path / "sim")
    swarm = Swarm(cfg, tmp_path / "sim")

    def interrupted(overrides=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(swarm, "launch", interrupted)
    r = swarm.run(progress=False)
    assert r["stopped"] and not r["ok"] and r["error"] is None and r["steps"] == 0
    assert not r["has_checkpoint"]
    text = printed(r)
    assert "FAILED" not in text and "stopped at step 0; no checkpoint written" in text
    assert "resbm sample" not in text


# ---- train's progress bar -------------------------------------------------------------------
def test_train_bar_shows_val_dash_before_the_first_eval(capsys):
    from node.trainer import ReferenceTrainer

    cfg = TrainConfig(model=TINY, steps=2, batch_size=2, eval_every=0, eval_batches=1)
    ReferenceTrainer(cfg, progress=True).run()
    bar = capsys.readouterr().err
    assert "val=-" in bar and "nan" not in bar


# ---- sample streams -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from node.trainer import ReferenceTrainer

    ck = tmp_path_factory.mktemp("ck")
    cfg = TrainConfig(model=TINY, steps=1, batch_size=2, eval_every=0, eval_batches=1)
    ReferenceTrainer(cfg.model_copy(update={"checkpoint_dir": ck}), progress=False).run()
    return ck


def test_generate_hands_out_the_text_as_it_is_sampled(checkpoint):
    from node.checkpoint import load_model
    from node.sample import generate

    model, _ = load_model(checkpoint)
    pieces: list[str] = []
    text = generate(model, "ROMEO:", 12, seed=1, on_text=pieces.append)
    assert pieces[0] == "ROMEO:" and "".join(pieces) == text
    assert len(pieces) > 2  # not all at the end
    assert generate(model, "ROMEO:", 12, seed=1) == text  # the same text without a callback


def test_a_character_split_over_byte_tokens_waits_for_its_last_byte():
    from node.sample import _Stream

    got: list[str] = []
    stream = _Stream(ByteTokenizer(), got.append)
    ids = list("aé".encode())  # a, then two bytes of é
    for n in range(1, len(ids) + 1):
        stream.push(ids[:n])
    assert got == ["a", "é"]
    stream.push([*ids, 0xE2])  # a dangling first byte, never completed
    stream.finish(ByteTokenizer().decode([*ids, 0xE2]))
    assert "".join(got) == "aé\ufffd"


def test_resbm_sample_prints_each_piece_when_it_is_sampled(checkpoint, capsys, monkeypatch):
    import node.sample

    real = node.sample.generate
    flushed: list[tuple[str, str]] = []

    def spy(*a, **kw):
        echo = a[7] if len(a) > 7 else kw["on_text"]

        def watched(piece: str) -> None:
            echo(piece)
            flushed.append((piece, capsys.readouterr().out))  # on stdout already?

        return real(*a[:7], on_text=watched)

    monkeypatch.setattr(node.sample, "generate", spy)
    args = ["sample", "--checkpoint-dir", str(checkpoint), "--prompt", "KING", "--tokens", "8"]
    assert main(args) == 0
    assert len(flushed) > 2 and flushed[0] == ("KING", "KING")
    assert all(piece == out for piece, out in flushed)
    assert capsys.readouterr().out == "\n"  # the closing newline, nothing printed twice


# ---- --link units --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("rate", "bps"),
    [
        ("10mbit", 10e6), ("10mbps", 10e6), ("10Mbps", 10e6), ("10Mbit", 10e6),
        ("10Mbit/s", 10e6), ("512kbit", 512e3), ("512kbps", 512e3), ("1.5gbit", 1.5e9),
        ("1Gbps", 1e9), ("9600bps", 9600.0), ("9600bit", 9600.0),
    ],
)  # fmt: skip
def test_link_rates_in_every_documented_unit(rate, bps):
    assert LinkSpec.parse(f"{rate}:40ms").rate_bps == pytest.approx(bps)


def test_simulate_accepts_mbps(tmp_path):
    cfg = SimulateConfig(model=TINY, link="10mbps:40ms", workdir=tmp_path)
    assert cfg.link_spec().rate_bps == 10e6


@pytest.mark.parametrize(("rate", "says"), [("10MBps", "80mbit"), ("1MB/s", "8mbit")])
def test_a_byte_rate_is_refused_with_the_bits_to_write(rate, says):
    with pytest.raises(ValueError, match="capital B is bytes") as err:
        LinkSpec.parse(f"{rate}:40ms")
    assert f"e.g. {says}" in str(err.value)


def test_an_unknown_unit_names_the_units():
    with pytest.raises(ValueError, match="mbps") as err:
        LinkSpec.parse("10furlongs:40ms")
    assert "rate '10furlongs'" in str(err.value)


def test_a_second_ctrl_c_kills_instead_of_draining_and_says_so(tmp_path, monkeypatch):
    cfg = SimulateConfig(model=TINY, steps=3, workdir=tmp_path / "sim")
    swarm = Swarm(cfg, tmp_path / "sim")
    killed = []

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(swarm, "launch", interrupted)
    monkeypatch.setattr(swarm, "stop_all", interrupted)  # Ctrl-C again while draining
    monkeypatch.setattr(swarm, "kill_all", lambda: killed.append(True))
    r = swarm.run(progress=False)
    assert killed and r["stopped"] and r["killed_on_stop"]
    text = printed(r)
    assert "stopped (Ctrl-C twice): nodes killed" in text and "FAILED" not in text


def test_a_link_may_be_a_rate_alone():
    """`--link 10mbps` (found by hand, refused): a rate with no added latency."""
    spec = LinkSpec.parse("10mbps")
    assert spec.rate_bps == pytest.approx(10e6) and spec.latency_s == 0.0
