#!/usr/bin/env bash
# Student search on the synthetic default (README, "Student search"): a teacher; three
# searches (distillation-aware, plain pruning = search.loss ce, no FLOPs weighting); every
# searched student and a hand-configured MLP of the same FLOPs distilled with KD and trained
# on hard labels from scratch; then the report. One process per run.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${DKD_SEARCH_OUT:-runs/search}
CFG=configs/search_synthetic.yaml
train() { dkd train -c "$CFG" --set out_dir="$OUT" --set search.enabled=false --overwrite "$@"; }
search() { dkd search -c "$CFG" --set out_dir="$OUT" --set teacher.checkpoint="$OUT/teacher" --overwrite "$@"; }
KD=(--set method.name=kd --set teacher.checkpoint="$OUT/teacher")
HARD=(--set method.name=hard)

# the teacher sees all 20,000 samples (the demo's teacher)
dkd train --set out_dir="$OUT" --set name=teacher --set method.name=hard --overwrite
t0=$(date +%s)
search --set name=search-kd
echo "search-kd took $(( $(date +%s) - t0 )) s (wall, start-up included)"
search --set name=search-ce --set search.loss=ce
search --set name=search-kd-noalpha --set search.flops_weighting=false

for s in search-kd search-ce search-kd-noalpha; do
  SPEC=(--set model.arch=searched --set model.spec="$OUT/$s/student.yaml")
  train --set name="student-$s-kd" "${SPEC[@]}" "${KD[@]}"
done
SPEC=(--set model.arch=searched --set model.spec="$OUT/search-kd/student.yaml")
train --set name=student-search-kd-hard "${SPEC[@]}" "${HARD[@]}"

# a hand-configured student: the default MLP family at depth 1, its width chosen so its
# backbone FLOPs match the searched student's (2 (80 h + 2 h^2) per sample)
H=$(python - "$OUT/search-kd/summary.json" <<'PY'
import json, math, sys
F = json.load(open(sys.argv[1]))["backbone_flops"]
print(max(1, round((-160 + math.sqrt(160 ** 2 + 16 * F)) / 8)))
PY
)
HAND=(--set model.hidden="$H" --set model.depth=1)
train --set name=hand-kd "${HAND[@]}" "${KD[@]}"
train --set name=hand-hard "${HAND[@]}" "${HARD[@]}"

dkd report "$OUT"/search-kd "$OUT"/student-* "$OUT"/hand-* --out "$OUT/report"
python - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
for d in sorted(out.iterdir()):
    s = d / "summary.json"
    if s.is_file():
        j = json.loads(s.read_text())
        print(f"{d.name:<28} {j.get('arch', ''):<9} {j['method']:<5} flops {j.get('backbone_flops', 0):>8,} "
              f"top-1 {j['top1']:6.2f} steps {j['steps']:>5} wall {j['wall_s']:7.1f} s"
              + (f" widths {j['search']['widths']}" if 'search' in j else ""))
print(f"report: {out / 'report' / 'report.md'}")
PY
