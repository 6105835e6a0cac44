#!/usr/bin/env bash
# GPU check (make gpu-check): on a machine with CUDA, in well under 8 minutes,
#  1. the CUDA tests: the sampled step on CUDA equals the same step on CPU, with
#     torch.cuda.set_sync_debug_mode("error") around the softmax layer (tests/test_cuda.py);
#  2. `dkd bench softmax` on CUDA at C = 1e5 and 1e6 (one process), with --trace-ops.
# It runs with whatever python3 has a CUDA torch (a GPU machine's own, with Triton) and
# puts this checkout on PYTHONPATH. Besides torch it imports pytest, PyYAML, numpy, tqdm
# and pydantic (dkd.config); DeepSpeed, W&B and typer are not imported by these two
# steps. A GPU machine without a package index gets what it lacks from .whl/ (made here
# by `make gpu-wheels`), installed into a scratch folder, never into its python.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] && .venv/bin/python -c "import torch; assert torch.cuda.is_available()" 2>/dev/null && PY=.venv/bin/python
OUT="${OUT:-runs/gpu_check}"
mkdir -p "$OUT"
SITE=""
if ls .whl/*.whl >/dev/null 2>&1; then
    SITE="${TMPDIR:-/tmp}/dkd-gpu-site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" .whl/*.whl
fi
export PYTHONPATH="$PWD${SITE:+:$SITE}${PYTHONPATH:+:$PYTHONPATH}"
"$PY" - <<'PY'
import torch
assert torch.cuda.is_available(), "gpu_check needs a CUDA device"
print("torch", torch.__version__, "on", torch.cuda.get_device_name(0))
PY
"$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/cuda_tests.txt"
"$PY" - "$OUT" <<'PY' 2>&1 | tee "$OUT/bench_cuda.txt"
import sys
from dkd.bench import bench_markdown, run_softmax_bench, write_bench
recs = run_softmax_bench([100_000, 1_000_000], [20, 120, 1000], 256, 512, [1],
                         ["uniform", "ftis", "dis"], ["batch_shared", "per_sample", "hybrid"],
                         3, 20, 100, trace_ops=True, device="cuda")
write_bench(recs, f"{sys.argv[1]}/bench_cuda.json")
print(bench_markdown(recs))
PY
echo "gpu check: results in $OUT"
