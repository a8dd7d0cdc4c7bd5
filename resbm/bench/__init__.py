"""Benchmarks: each prints a table and writes benchmarks/results/*.json and a plot."""


def add_device_args(p) -> None:
    """`--device` and `--precision` for a benchmark's runs (the training commands' meaning)."""
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda[:N], mps")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="default fp32")
