#!/usr/bin/env bash
# Two data-parallel processes on the CPU (gloo) running the plain accelerate loop; on GPUs drop OMP_NUM_THREADS
# and the same command uses NCCL. `accelerate launch --num_processes 2 examples/train_accelerate.py` works too
# where an accelerate config selects multi-process training.
set -euo pipefail
cd "$(dirname "$0")/.."
OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 examples/train_accelerate.py --steps "${STEPS:-10}" "$@"
