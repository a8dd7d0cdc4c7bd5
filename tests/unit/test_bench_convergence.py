"""`resbm bench convergence` writes the promised schema, a plot, and with --resume skips
finished runs."""

from __future__ import annotations

import json

from resbm.cli import main


def test_convergence_bench_writes_results_and_resumes(tmp_path, capsys):
    out = tmp_path / "conv.json"
    args = [
        "bench",
        "convergence",
        "--quick",
        "--steps",
        "2",
        "--stages",
        "2",
        "--out",
        str(out),
        "--threads",
        "1",
    ]
    assert main(args) == 0
    runs = json.loads(out.read_text())["runs"]
    assert len(runs) == 8
    for r in runs:
        for key in (
            "compression",
            "optimizer",
            "identity_path",
            "encoder",
            "d_model",
            "stages",
            "steps",
            "tokens",
            "val_loss",
            "wire_bytes_ratio",
        ):
            assert key in r, key
    kinds = {(r["compression"], r["optimizer"], r["identity_path"], r["encoder"]) for r in runs}
    assert (128, "muon", False, "mlp") in kinds and (128, "muon", True, "fused") in kinds
    assert {r["optimizer"] for r in runs if r["compression"] == 32} == {"muon", "adamw"}
    assert out.with_suffix(".png").stat().st_size > 1000
    table = capsys.readouterr().out
    assert "gap %" in table and "uncompressed" in table

    stamp = out.stat().st_mtime_ns
    assert main([*args, "--resume"]) == 0  # all there: nothing retrained, nothing rewritten
    assert out.stat().st_mtime_ns == stamp
    assert "8 already in" in capsys.readouterr().err
