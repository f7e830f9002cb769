#!/usr/bin/env bash
# One machine, every GPU (or NUM_PROCS CPU processes when there is none).
#   launch/single_node.sh configs/default.toml --train.max_steps=500
set -euo pipefail
config=${1:?usage: launch/single_node.sh CONFIG [--section.field=value ...]}; shift
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
  procs=${NUM_PROCS:-$(nvidia-smi -L | wc -l)}
else
  export DS_ACCELERATOR=cpu
  procs=${NUM_PROCS:-2}
fi
exec deepspeed --num_gpus "$procs" train.py --config "$config" "$@"
