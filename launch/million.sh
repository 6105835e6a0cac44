#!/usr/bin/env bash
# C = 10^6 end to end (configs/synthetic_1m.yaml): teacher, sharded relabel, DIS student on
# 2 ranks and on 1 rank; prints each run's peak resident memory per rank.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${DKD_MILLION_OUT:-runs/million}
CFG=configs/synthetic_1m.yaml
run2() { torchrun --standalone --nproc_per_node 2 -m dkd "$@"; }
run2 train -c "$CFG" --set out_dir="$OUT" --set name=teacher --set method.name=hard \
    --set teacher.store=null --set train.steps=40 --overwrite
/usr/bin/time -v torchrun --standalone --nproc_per_node 2 -m dkd relabel -c "$CFG" \
    --set teacher.checkpoint="$OUT/teacher" --set teacher.store="$OUT/store" \
    --set teacher.sharded=true --batch-size 128 --overwrite 2> "$OUT/relabel.time"
run2 train -c "$CFG" --set out_dir="$OUT" --set name=dis-2ranks --overwrite
dkd train -c "$CFG" --set out_dir="$OUT" --set name=dis-1rank --overwrite
python - "$OUT" <<'PY'
import json, pathlib, re, sys
out = pathlib.Path(sys.argv[1])
for name in ("teacher", "dis-2ranks", "dis-1rank"):
    s = json.loads((out / name / "summary.json").read_text())
    print(f"{name:<11} ranks {s['world_size']} peak RSS per rank (MiB) {s['peak_rss_mib']} "
          f"wall {s['wall_s']:.1f} s")
t = (out / "relabel.time").read_text()
print("relabel (2 ranks, sharded teacher): max RSS of one process (MiB)",
      int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", t).group(1)) // 1024)
PY
