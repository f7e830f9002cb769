#!/usr/bin/env bash
# A two-node run on this one machine: two launchers, --no_ssh, node ranks 0 and 1, loopback master.
# It exercises the multi-node code path (world info, node ranks, rendezvous) without a second host.
#   launch/two_nodes_local.sh configs/default.toml --train.max_steps=4
set -euo pipefail
config=${1:?usage: launch/two_nodes_local.sh CONFIG [--section.field=value ...]}; shift
hostfile=$(mktemp)
trap 'rm -f "$hostfile"' EXIT
printf 'node0 slots=1\nnode1 slots=1\n' > "$hostfile"
port=${MASTER_PORT:-$((20000 + RANDOM % 20000))}
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
common=(--hostfile "$hostfile" --no_ssh --master_addr 127.0.0.1 --master_port "$port")
deepspeed "${common[@]}" --node_rank 1 train.py --config "$config" "$@" &
node1=$!
status=0
deepspeed "${common[@]}" --node_rank 0 train.py --config "$config" "$@" || status=$?
wait "$node1" || status=$?
exit "$status"
