#!/usr/bin/env bash
# The DeepSpeed launcher with a hostfile (lines "hostname slots=N"; see launch/hostfile.example):
#   HOSTFILE=launch/hostfile.example launch/deepspeed.sh --config configs/synthetic.yaml
# One machine without a hostfile: NPROC=2 launch/deepspeed.sh --set method.name=hard
set -euo pipefail
if [ -n "${HOSTFILE:-}" ]; then
  exec deepspeed --hostfile "$HOSTFILE" --no_local_rank --module dkd train "$@"
fi
exec deepspeed --num_gpus "${NPROC:-1}" --no_local_rank --module dkd train "$@"
