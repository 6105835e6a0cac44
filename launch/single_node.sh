#!/usr/bin/env bash
# One node, N processes (GPUs, or CPU ranks with gloo):
#   launch/single_node.sh 4 --config configs/synthetic.yaml --set method.name=dis --set method.k=100
set -euo pipefail
NPROC=${1:?usage: single_node.sh NPROC --config FILE [--set k=v ...]}; shift
exec torchrun --standalone --nproc_per_node "$NPROC" -m dkd train "$@"
