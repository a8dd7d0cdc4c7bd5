"""On a CUDA machine (marked `gpu`; skipped without one): the device path end to end."""

from __future__ import annotations

import pytest
import torch

from node.config import TrainConfig
from node.trainer import ReferenceTrainer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

TINY = {"d_model": 128, "n_heads": 2, "n_layers": 2, "seq_len": 64, "compression": 32}


def _trainer(device: str, precision: str = "fp32") -> ReferenceTrainer:
    cfg = TrainConfig(
        model=TINY,
        steps=5,
        batch_size=4,
        eval_every=0,
        eval_batches=2,
        device=device,
        precision=precision,
    )
    return ReferenceTrainer(cfg, progress=False)


def _run(device: str, precision: str = "fp32") -> dict:
    return _trainer(device, precision).run()


def test_cuda_training_matches_the_cpu_in_fp32():
    cpu, gpu = _run("cpu"), _run("cuda")
    for a, b in zip(cpu["loss_history"], gpu["loss_history"], strict=True):
        assert abs(a - b) < 2e-3 * a, (a, b)  # TF32 matmuls on the GPU
    assert gpu["device"].startswith("NVIDIA") or gpu["device"]
    assert gpu["peak_memory_bytes"] > 0


def test_cuda_bf16_trains_with_fused_adamw_and_reports_mfu():
    trainer = _trainer("cuda", "bf16")
    r = trainer.run()
    assert r["loss_history"][-1] < r["loss_history"][0]
    assert r["precision"] == "bf16"
    adamw = [o for rt in trainer.runtimes for o in rt.optimizers if type(o) is torch.optim.AdamW]
    assert adamw and all(g["fused"] for o in adamw for g in o.param_groups)
    if "H200" in r["device"] or "H100" in r["device"] or "A100" in r["device"]:
        assert r["mfu"] is not None and 0 < r["mfu"] < 1


def test_a_cuda_runtime_hands_host_tensors_to_the_wire():
    from node.data import Batches, Corpus
    from node.model.config import ModelConfig, OptimSettings
    from node.model.resbm import ResBM
    from node.runtime import StageRuntime

    cfg = ModelConfig(**TINY)
    batches = Batches(Corpus.load(None), cfg.seq_len, 2, seed=0)
    rt = StageRuntime(ResBM(cfg).stage(0), OptimSettings(), batches, 1, "cuda", "bf16")
    mb = batches.microbatch(0, 0)
    z = rt.forward(mb)
    assert z.device.type == "cpu" and z.dtype == torch.float32 and z.is_pinned()
    rt.backward(mb.id, torch.ones_like(z))
    assert all(p.device.type == "cuda" for p in rt.stage.parameters())
