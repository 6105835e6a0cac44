#!/usr/bin/env bash
# The demo: train a teacher, a hard-label student and a distilled student on the embedded
# synthetic default, each on 2 CPU ranks under torchrun, then print the three accuracies.
# Extra arguments are passed to every `dkd train` (e.g. --set data.num_classes=1000).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${DKD_DEMO_OUT:-runs/demo}
NPROC=${NPROC:-2}
STUDENT=(--set model.hidden=32 --set model.depth=1 --set model.feature_dim=32 --set train.steps=500)
run() { torchrun --standalone --nproc_per_node "$NPROC" -m dkd train --set out_dir="$OUT" --overwrite "$@"; }

run --set name=teacher --set method.name=hard "$@"
run --set name=student-hard --set method.name=hard "${STUDENT[@]}" "$@"
run --set name=student-kd --set method.name=kd --set teacher.checkpoint="$OUT/teacher" "${STUDENT[@]}" "$@"
run --set name=student-dis --set method.name=dis --set method.k=10 --set method.top_t=3 \
    --set teacher.checkpoint="$OUT/teacher" "${STUDENT[@]}" "$@"

dkd report "$OUT/teacher" "$OUT/student-hard" "$OUT/student-kd" "$OUT/student-dis" --out "$OUT/report"

python - "$OUT" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
print(f"\nrun directory: {out.resolve()}")
print(f"{'run':<14} {'method':<6} {'k':>4} {'top-1 %':>8} {'wall s':>7}")
for name in ("teacher", "student-hard", "student-kd", "student-dis"):
    s = json.loads((out / name / "summary.json").read_text())
    print(f"{name:<14} {s['method']:<6} {str(s['k'] or '-'):>4} {s['top1']:>8.2f} {s['wall_s']:>7.1f}")
print(f"\nprofiling report: {(out / 'report' / 'report.md').resolve()}")
PY
