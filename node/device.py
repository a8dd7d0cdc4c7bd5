"""Where a stage computes and in what precision: the one module that knows about devices.

Everything above the stage runtime (wire, links, averaging, checkpoints) sees host fp32 tensors,
which is why nodes on different devices can serve neighbouring stages of one swarm: the wire
format has no device in it. The runtime moves tensors across the host/device edge here, through
pinned host buffers with non-blocking copies on CUDA (a pageable copy would serialize with
compute and cost a second staging copy inside the driver).

Precision `bf16` is autocast with fp32 master weights and optimizer state (the usual mixed
precision of torchtitan and nanoGPT): matmuls and attention run in bf16, reductions, norms and
the loss in fp32, and nothing needs a loss scaler because bf16 has fp32's exponent range. CPUs
autocast too, which is how the mixed-precision path is tested without a GPU.
"""

from __future__ import annotations

import contextlib
import re
import resource
import sys

import torch

from node.config import DEVICE_PATTERN

PRECISIONS = ("fp32", "bf16")


class DeviceError(ValueError):
    """The device asked for is not here; the message names --device."""


def resolve(spec: str) -> torch.device:
    """`auto` is CUDA when a GPU is visible, else the CPU; anything else must exist."""
    if not re.match(DEVICE_PATTERN, spec):
        raise DeviceError(f"--device {spec!r}: use auto, cpu, cuda, cuda:N or mps")
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                f"--device {spec}: no CUDA device is visible to torch {torch.__version__} "
                "(a CPU build, or no driver); use --device cpu or auto"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(
                f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) here "
                f"(cuda:0..cuda:{torch.cuda.device_count() - 1})"
            )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError("--device mps: Apple's Metal backend is not available here")
    return dev


def configure(dev: torch.device) -> None:
    """Process-wide settings for fast training on `dev`: TF32 matmuls on CUDA (Ampere and newer
    run fp32 matmuls through tensor cores with a 10-bit mantissa, ~8x faster; the reference
    trainer and every node set the same, so a swarm still reproduces `resbm train`)."""
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.cuda.set_device(dev)


def autocast(dev: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The forward pass's precision context (backward runs outside it, as autocast intends)."""
    if precision not in PRECISIONS:
        raise ValueError(f"--precision {precision!r}: use one of {PRECISIONS}")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=dev.type, dtype=torch.bfloat16)


class HostEdge:
    """Moves boundary tensors between the host (where the wire is) and the compute device.

    To the device: a pinned copy, then a non-blocking transfer. To the host: a non-blocking copy
    into a pinned buffer, then one synchronize, so the caller gets a finished fp32 host tensor.
    On the CPU both directions are free (no copy at all)."""

    def __init__(self, dev: torch.device):
        self.dev = dev
        self.cuda = dev.type == "cuda"

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        if t.device == self.dev:
            return t
        if self.cuda and t.device.type == "cpu":
            return t.pin_memory().to(self.dev, non_blocking=True)
        return t.to(self.dev)

    def to_host(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        if t.device.type == "cpu":
            return t.float()
        if self.cuda:
            buf = torch.empty(t.shape, dtype=torch.float32, pin_memory=True)
            buf.copy_(t, non_blocking=True)  # casts to fp32 on the way
            torch.cuda.current_stream(self.dev).synchronize()
            return buf
        return t.float().cpu()


def name(dev: torch.device) -> str:
    """What the device is, for results and MFU: the GPU's marketing name, or `cpu`."""
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return dev.type


def reset_peak_memory(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)


def peak_memory_bytes(dev: torch.device) -> int:
    """The device's high-water mark of allocated memory; on the CPU the process's peak RSS
    (everything it holds, not only tensors: an upper bound, said so where it is reported)."""
    if dev.type == "cuda":
        return int(torch.cuda.max_memory_allocated(dev))
    if dev.type == "mps":
        return int(torch.mps.driver_allocated_memory())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB


def run_facts(dev: torch.device, precision: str, model_cfg, tokens_per_s: float, parameters: int):
    """What `train --json` and `simulate --json` report about the hardware: parameters, the
    device, precision, peak memory, and MFU (model FLOPs per second over the device's dense
    peak; null where that peak is unknown, as on CPUs)."""
    from node.model.presets import flops_per_token, mfu, peak_flops

    return {
        "parameters": parameters,
        "device": name(dev),
        "precision": precision,
        "peak_memory_bytes": peak_memory_bytes(dev),
        "mfu": mfu(flops_per_token(model_cfg), tokens_per_s, peak_flops(name(dev), precision)),
    }
