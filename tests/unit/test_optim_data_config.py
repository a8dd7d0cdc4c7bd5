"""Optimizer groups, Muon, schedule, data determinism, tokenizer, and config errors."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from node.config import TRAIN_FLAGS, TrainConfig
from node.data import Batches, ByteTokenizer, Corpus, DataMismatchError, bundled_corpus_path
from node.model.config import OptimSettings
from node.model.optim import (
    Muon,
    build_optimizers,
    lr_factor,
    newton_schulz,
    param_groups,
)
from node.model.resbm import ResBM
from node.settings import ConfigError, load_settings
from tests.helpers import tiny_model


@pytest.mark.parametrize("encoder", ["mlp", "fused"])
def test_every_parameter_in_exactly_one_group_and_muon_only_on_hidden_matrices(encoder):
    model = ResBM(tiny_model(encoder=encoder))
    for stage in model.stages():
        opts = build_optimizers(stage, OptimSettings(name="muon"))
        seen = [id(p) for o in opts for g in o.param_groups for p in g["params"]]
        assert sorted(seen) == sorted(id(p) for p in stage.parameters())
        assert len(seen) == len(set(seen))
        names = {id(p): n for n, p in stage.named_parameters()}
        for opt in opts:
            for g in opt.param_groups:
                for p in g["params"]:
                    if isinstance(opt, Muon):
                        assert p.dim() == 2, names[id(p)]
                        assert not names[id(p)].startswith(("embed", "head")), names[id(p)]
                    else:
                        assert p.dim() != 2 or names[id(p)].startswith(("embed", "head"))


def test_embed_and_head_go_to_adamw():
    model = ResBM(tiny_model())
    hidden, rest = param_groups(model)
    assert any(p is model.embed.weight for p in rest)
    assert any(p is model.head.weight for p in rest)
    assert all(p.dim() == 2 for p in hidden)


def test_adamw_optimizer_is_one_adamw():
    opts = build_optimizers(ResBM(tiny_model()).stage(1), OptimSettings(name="adamw"))
    assert len(opts) == 1 and isinstance(opts[0], torch.optim.AdamW)


def test_newton_schulz_orthogonalizes_in_fp32():
    g = torch.randn(64, 200)
    out = newton_schulz(g, (3.4445, -4.775, 2.0315), 5, 1e-7)
    assert out.dtype == torch.float32 and out.shape == g.shape
    s = torch.linalg.svdvals(out)
    assert s.min() > 0.5 and s.max() < 1.5  # Muon's NS lands singular values in ~[0.7, 1.2]


def test_muon_matches_torch_muon_up_to_bf16_rounding():
    torch.manual_seed(0)
    w = torch.randn(32, 48)
    p1, p2 = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    ours = Muon([p1], lr=1e-2, adjust_lr_fn="match_rms_adamw")
    ref = torch.optim.Muon([p2], lr=1e-2, adjust_lr_fn="match_rms_adamw")
    for _ in range(3):
        g = torch.randn(32, 48)
        p1.grad, p2.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    step = (p2 - w).abs().mean()
    assert (p1 - p2).abs().mean() < 0.05 * step
    assert ours.state_dict()["state"][0].keys() == ref.state_dict()["state"][0].keys()


def test_schedule_warms_up_then_decays_to_min():
    s = OptimSettings(warmup_steps=10, total_steps=100, min_lr_ratio=0.1)
    assert lr_factor(0, s) == pytest.approx(0.1)
    assert lr_factor(9, s) == pytest.approx(1.0)
    assert lr_factor(100, s) == pytest.approx(0.1)
    values = [lr_factor(i, s) for i in range(10, 101)]
    assert all(a >= b for a, b in itertools.pairwise(values))


def test_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "To be, or not to be — that is the question: ünïcode ✓\n"
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids) and len(ids) == len(text.encode())
    assert tok.decode(ids) == text


def test_bundled_corpus_is_tiny_shakespeare_and_split_is_deterministic():
    corpus = Corpus.load()
    assert bundled_corpus_path().is_file()
    assert corpus.tokens.numel() == 1115394
    assert corpus.train.numel() + corpus.val.numel() == corpus.tokens.numel()
    assert corpus.fingerprint == Corpus.load().fingerprint


def test_microbatch_is_a_pure_function_of_seed_step_index():
    corpus = Corpus.load()
    a, b = Batches(corpus, 32, 4, seed=3), Batches(corpus, 32, 4, seed=3)
    assert torch.equal(a.microbatch(5, 1).offsets, b.microbatch(5, 1).offsets)
    assert not torch.equal(a.microbatch(5, 1).offsets, a.microbatch(5, 2).offsets)
    assert not torch.equal(a.microbatch(5, 1).offsets, a.microbatch(6, 1).offsets)
    assert not torch.equal(
        a.microbatch(5, 1).offsets, Batches(corpus, 32, 4, 4).microbatch(5, 1).offsets
    )
    mb = a.microbatch(0, 0)
    x, y = a.inputs(mb), a.targets(mb)
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the next tokens


def test_last_stage_refuses_a_microbatch_from_another_corpus(tmp_path):
    other = tmp_path / "other.txt"
    other.write_text("something else entirely " * 200)
    theirs = Batches(Corpus.load(other), 16, 2, seed=0)
    ours = Batches(Corpus.load(), 16, 2, seed=0)
    with pytest.raises(DataMismatchError, match="--data"):
        ours.targets(theirs.microbatch(0, 0))


def test_data_flag_takes_any_file_and_rejects_missing_or_tiny(tmp_path):
    with pytest.raises(FileNotFoundError, match="--data"):
        Corpus.load(tmp_path / "nope.txt")
    small = tmp_path / "small.txt"
    small.write_text("x" * 100)
    with pytest.raises(ValueError, match="seq_len"):
        Batches(Corpus.load(small), 128, 2, 0)


FLAGS = {k: v[0] for k, v in TRAIN_FLAGS.items()}


@pytest.mark.parametrize(
    "cli,needle",
    [
        ({"optim.lr": -1.0}, "setting 'optim.lr' (--lr, RESBM_OPTIM__LR)"),
        ({"steps": 0}, "setting 'steps' (--steps"),
        ({"model.compression": 3}, "compression (3) must divide d_model"),
        ({"model.n_heads": 3}, "divisible by n_heads"),
        ({"model.n_stages": 9}, "n_stages (9) cannot exceed n_layers"),
        ({"optim.name": "sgd"}, "setting 'optim.name' (--optimizer"),
        ({"resume": True}, "--checkpoint-dir"),
    ],
)
def test_config_errors_name_the_setting(cli, needle):
    with pytest.raises(ConfigError) as err:
        load_settings(TrainConfig, cli, None, FLAGS)
    assert needle in str(err.value)


def test_config_sources_priority_cli_over_env_over_file(tmp_path, monkeypatch):
    f = tmp_path / "run.toml"
    f.write_text("steps = 7\nseed = 5\n[model]\nd_model = 64\ncompression = 16\n")
    monkeypatch.setenv("RESBM_SEED", "6")
    monkeypatch.setenv("RESBM_MODEL__N_LAYERS", "2")
    cfg = load_settings(TrainConfig, {"steps": 9}, f, FLAGS)
    assert (cfg.steps, cfg.seed, cfg.model.d_model, cfg.model.n_layers) == (9, 6, 64, 2)
    assert cfg.optim.total_steps == 9  # the schedule follows the run length


def test_unknown_setting_in_file_is_an_error(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("stepz = 7\n")
    with pytest.raises(ConfigError, match="stepz"):
        load_settings(TrainConfig, {}, f, FLAGS)


def test_missing_config_file_names_the_flag(tmp_path):
    with pytest.raises(ConfigError, match="--config"):
        load_settings(TrainConfig, {}, tmp_path / "none.toml", FLAGS)


def test_ln256_is_the_untrained_loss():
    """Sanity for the convergence test: an untrained model predicts ~uniform bytes."""
    model = ResBM(tiny_model())
    x = torch.randint(0, 256, (2, 16))
    assert abs(model.loss(x, x).item() - math.log(256)) < 0.3
