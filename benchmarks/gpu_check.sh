#!/usr/bin/env bash
# The GPU check, as one script sized to finish in under 8 minutes on one H200 (the device tool
# lends such a machine to some tasks; CI never has one). Writes JSON into $OUT (default
# benchmarks/results):
#   gpu-tests.txt          pytest -m gpu (tests/gpu): the device path end to end
#   device-<kind>.json     resbm bench device --device cuda (tiny/small/base, fp32 vs bf16, MFU)
#   gpu-exactness.json     a 2-process `simulate --device cuda` (fp32 wire) against
#                          `resbm train --device cuda`: per-step losses within 1e-5
# The machine cannot reach PyPI: carry the project's missing dependencies as wheels in .whl/
# (hivemind, pydantic-settings, grpcio-tools, ...: `pip download` them for its Python), or
# have them installed; the script installs the project itself without touching torch.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
status=0

if ! $PY -c "import resbm, hivemind" 2>/dev/null; then
    if [ -d .whl ]; then
        $PY -m pip install -q --no-index --find-links .whl -e . || status=1
    else
        $PY -m pip install -q --no-deps -e . || status=1
    fi
fi
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())" || exit 1

echo "== pytest -m gpu"
timeout 120 $PY -m pytest -m gpu tests/gpu -q -p no:cacheprovider 2>&1 | tee "$OUT/gpu-tests.txt" || status=1

echo "== resbm bench device --device cuda"
timeout 240 $PY -m resbm.cli bench device --device cuda --simulate-steps 20 \
    --out "$OUT/device-gpu.json" || status=1

echo "== simulate --device cuda vs train --device cuda (fp32 wire)"
timeout 150 $PY - "$OUT/gpu-exactness.json" <<'PYEOF' || status=1
import json, sys, tempfile
from pathlib import Path
from node.trainer import ReferenceTrainer
from resbm.simulate import SimulateConfig, Swarm

with tempfile.TemporaryDirectory() as tmp:
    cfg = SimulateConfig(
        preset="small", model={"n_stages": 2}, steps=10, batch_size=8, microbatches=4,
        wire_codec="fp32", device="cuda", workdir=Path(tmp), eval_batches=2,
    )
    swarm = Swarm(cfg, Path(tmp)).run(progress=False)
ref = ReferenceTrainer(cfg.train_config(), progress=False).run()
diffs = [abs(a - b) / abs(b) for a, b in zip(swarm["loss_history"], ref["loss_history"])]
ok = swarm["ok"] and len(diffs) == cfg.steps and max(diffs) <= 1e-5
result = {"ok": ok, "max_rel_diff": max(diffs, default=None), "swarm": swarm["loss_history"],
          "train": ref["loss_history"], "swarm_tokens_per_s": swarm["tokens_per_s"],
          "train_tokens_per_s": ref["tokens_per_s"], "device": ref["device"],
          "train_mfu": ref["mfu"], "peak_memory_bytes": ref["peak_memory_bytes"]}
Path(sys.argv[1]).write_text(json.dumps(result, indent=1))
print(json.dumps({k: v for k, v in result.items() if k not in ("swarm", "train")}))
sys.exit(0 if ok else 1)
PYEOF
echo "gpu_check: $([ $status = 0 ] && echo passed || echo FAILED)"
exit $status
