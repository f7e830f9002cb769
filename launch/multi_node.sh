#!/usr/bin/env bash
# Several machines over passwordless ssh; run on the first node of the hostfile.
#   HOSTFILE=launch/hostfile launch/multi_node.sh configs/default.toml --model.pretrained_dir=/models/sd15
# Environment variables for every node (NCCL settings, HF_HUB_OFFLINE, paths) go in .deepspeed_env in
# the directory you launch from (or in ~), one VAR=value per line: the launcher exports them on each node.
# Checkpoints and exports are written under logging.run_dir by every rank: put it on a shared filesystem.
set -euo pipefail
config=${1:?usage: launch/multi_node.sh CONFIG [--section.field=value ...]}; shift
hostfile=${HOSTFILE:-launch/hostfile}
master=${MASTER_ADDR:-$(head -n1 < <(grep -v '^#' "$hostfile" | grep .) | awk '{print $1}')}
exec deepspeed --hostfile "$hostfile" --master_addr "$master" --master_port "${MASTER_PORT:-29500}" \
  train.py --config "$config" "$@"
