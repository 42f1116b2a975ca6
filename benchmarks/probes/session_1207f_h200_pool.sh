#!/bin/bash
# usage: session_1207f_h200_pool.sh [SECONDS]   (default 440; carry [".whl", ".data_xz"])
# 2026-12-07 (sixth session): the 256-model lean compiled LiRA pool (issue 23 goal 2's config) on the goal's GPU,
# an H200, if one starts; then, in the time left, nothing else (the pool's timing is the point).
T=${1:-440}
MARGIN=5
. benchmarks/probes/device_setup.sh
unpack_cifar
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv > $W/gpu_$G.txt
timeout $(left) python3 benchmarks/membership.py benchmarks/configs/cifar10_membership_256_airbench_lean_compile.yaml \
  --device cuda --name cifar10_membership_256_airbench_lean_compile_$G > $W/pool_compile_$G.log 2>&1
echo "pool rc $? after $((SECONDS-T0)) s"; cp benchmarks/results/membership_cifar10_membership_256_airbench_lean_compile_$G.* $W/ 2>/dev/null
grep -E "lira|Pool:|After" $W/pool_compile_$G.log | cut -c1-400; pack
