#!/usr/bin/env bash
# Several nodes with torchrun's c10d rendezvous. Run the same command on every node:
#   NNODES=2 NPROC=8 RDZV=node0.example:29500 launch/multi_node.sh --config configs/x.yaml
# Try-out with two "nodes" on one machine (two terminals, or & for the first):
#   NNODES=2 NPROC=1 RDZV=127.0.0.1:29500 launch/multi_node.sh --set method.name=hard &
#   NNODES=2 NPROC=1 RDZV=127.0.0.1:29500 launch/multi_node.sh --set method.name=hard
set -euo pipefail
: "${NNODES:?set NNODES}" "${NPROC:?set NPROC (processes per node)}" "${RDZV:?set RDZV=host:port}"
exec torchrun --nnodes "$NNODES" --nproc_per_node "$NPROC" --rdzv_backend c10d \
    --rdzv_endpoint "$RDZV" --rdzv_id "${RDZV_ID:-dkd}" -m dkd train "$@"
