#!/bin/bash
# usage: session_next_pool1.sh [SECONDS]   (default 560; carry [".whl", ".data_xz"])
# Prepared 2026-12-07 (fifth session) for the next device call, issue 23 goals 2 and 5:
# 1. the GPU tests of the compiled graph and of recipe.compile: auto (written after that session's device time ran out);
# 2. the 256-model lean pool with compile: auto (what the probe picks, and the pool's time with it).
# Ran on an H100 on 2026-12-07 (sixth session): benchmarks/results/gpu_tests_2026-12-07_sixth_compile_h100.txt and
# membership_cifar10_membership_256_airbench_lean_auto_h100.md (with the probe of that day, since replaced).
T=${1:-560}
MARGIN=8
. benchmarks/probes/device_setup.sh
unpack_cifar
timeout 150 python3 -m pytest -q -s -p no:cacheprovider -m gpu tests/gpu/test_cuda_factory.py -k "compile" -rs \
  > $W/gpu_tests_compile_$G.txt 2>&1
echo "tests rc $? after $((SECONDS-T0)) s" | tee -a $W/gpu_tests_compile_$G.txt
grep -E "passed|failed|compile auto" $W/gpu_tests_compile_$G.txt | tail -6; pack
timeout $(left) python3 benchmarks/membership.py benchmarks/configs/cifar10_membership_256_airbench_lean_auto.yaml \
  --device cuda --name cifar10_membership_256_airbench_lean_auto_$G > $W/pool_auto.log 2>&1
echo "pool rc $? after $((SECONDS-T0)) s"; cp benchmarks/results/membership_cifar10_membership_256_airbench_lean_auto_$G.* $W/ 2>/dev/null
grep -E "lira|Pool:|After" $W/pool_auto.log | cut -c1-400; pack
