#!/usr/bin/env bash
# The demo: on the embedded synthetic default, each run on 2 CPU ranks under torchrun: a
# teacher, then hard-label, KD and DIS students; then full KD against DIS at C = 10,000;
# then the profiling report. Prints the accuracies, softmax-layer times and the report path.
# Extra arguments are passed to every `dkd train` (e.g. --set data.num_classes=1000).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${DKD_DEMO_OUT:-runs/demo}
NPROC=${NPROC:-2}
# Students: a small MLP that sees only 2,000 labelled samples (the teacher saw 20,000), so
# the teacher's knowledge is worth ~30 points over hard labels.
STUDENT=(--set model.hidden=32 --set model.depth=1 --set model.feature_dim=32 --set train.steps=2000
         --set data.train_size=2000 --set train.log_every=500)
run() { torchrun --standalone --nproc_per_node "$NPROC" -m dkd train --set out_dir="$OUT" --overwrite "$@"; }

run --set name=teacher --set method.name=hard "$@"
run --set name=student-hard --set method.name=hard "${STUDENT[@]}" "$@"
run --set name=student-kd --set method.name=kd --set teacher.checkpoint="$OUT/teacher" "${STUDENT[@]}" "$@"
# DIS in the paper's per-sample mode: 10 of the 100 columns per row (target, teacher top-3,
# 6 draws from the two-Laplace proposal over teacher ranks).
run --set name=student-dis --set method.name=dis --set method.k=6 --set method.top_t=3 \
    --set method.mode=per_sample --set teacher.checkpoint="$OUT/teacher" "${STUDENT[@]}" "$@"

# Where sampling pays: C = 10,000 classes, a short teacher, then full KD against DIS
# (k = 1000 draws, batch-shared, stratified over the 2 ranks): the report's second table.
BIG=(--set data.num_classes=10000 --set data.num_super_classes=16 --set model.feature_dim=128
     --set train.batch_size=256 --set train.steps=40 --set train.log_every=1)
run --set name=c10k-teacher --set method.name=hard "${BIG[@]}" "$@"
run --set name=c10k-kd --set method.name=kd --set teacher.checkpoint="$OUT/c10k-teacher" "${BIG[@]}" "$@"
run --set name=c10k-dis --set method.name=dis --set method.k=1000 --set method.top_t=3 \
    --set teacher.checkpoint="$OUT/c10k-teacher" "${BIG[@]}" "$@"

dkd report "$OUT/teacher" "$OUT/student-hard" "$OUT/student-kd" "$OUT/student-dis" \
    "$OUT/c10k-kd" "$OUT/c10k-dis" --out "$OUT/report"

python - "$OUT" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
print(f"\nrun directory: {out.resolve()}")
print(f"{'run':<18} {'method':<6} {'mode':<12} {'classes':>7} {'k':>5} {'top-1 %':>8} "
      f"{'softmax ms':>10}")
for name in ("teacher", "student-hard", "student-kd", "student-dis",
             "c10k-kd", "c10k-dis"):
    s = json.loads((out / name / "summary.json").read_text())
    ms = sorted(json.loads(l)["softmax_ms"] for l in (out / name / "metrics.jsonl").open()
                if '"kind": "train"' in l)
    mode = s["mode"] if s["k"] and s["method"] in ("uniform", "ftis", "dis") else "-"
    print(f"{name:<18} {s['method']:<6} {mode:<12} {s['classes']:>7} {str(s['k'] or '-'):>5} "
          f"{s['top1']:>8.2f} {ms[len(ms) // 2]:>10.2f}")
print(f"\nprofiling report: {(out / 'report' / 'report.md').resolve()}")
PY

# The real-text benchmark is too long for the demo (about an hour on 2 cores): point to it.
if [ -f runs/text/report/report.md ]; then
    echo "real-text benchmark (make text-experiment): $(cd runs/text/report && pwd)/report.md"
elif [ -d /usr/share/games/fortunes ]; then
    echo "real text: 'make text-experiment' distils a 20,001-word vocabulary from the fortunes corpus"
else
    echo "real text: apt-get install fortunes (or set DKD_TEXT_CORPUS=FILE.txt), then 'make text-experiment'"
fi
