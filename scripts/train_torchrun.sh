#!/usr/bin/env bash
# One node, all its GPUs:   scripts/train_torchrun.sh configs/stage1_vitg.yaml output_dir=runs/s1
# Several nodes: run on every node with NNODES, NODE_RANK and MASTER_ADDR set (the SLURM script does this).
set -euo pipefail
config=$1; shift
exec torchrun \
  --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" \
  --nproc_per_node "${NPROC_PER_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l | awk '{print ($1 > 0) ? $1 : 1}')}" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
  -m tasks.train "$config" "$@"
