#!/bin/bash
# usage: session_1207e2.sh [SECONDS]   (default 540; carry [".whl", ".data_xz"])
# Second device call of 2026-12-07 (fifth session):
# 1. the compiled-graph GPU test with the tolerance of the vmap layout (the first call's 1e-5 failed at 6.2e-5);
# 2. where a pool model's time goes with recipe.compile (pool_chunk_profile.py, 16 models, K = 4); this also fills
#    inductor's on-disk caches (FX graph, AOT autograd, Triton) for the airbench network;
# 3. the 256-model lean compiled pool again, now with those caches warm (a user's second run on one machine; the
#    first call's run paid the compile: 273.6 s whole).
T=${1:-540}
MARGIN=8
. benchmarks/probes/device_setup.sh
unpack_cifar
timeout 90 python3 -m pytest -q -s -p no:cacheprovider -m gpu tests/gpu/test_cuda_factory.py -k "compiled_step" -rs \
  > $W/gpu_tests_compiled_$G.txt 2>&1
echo "tests rc $? after $((SECONDS-T0)) s" | tee -a $W/gpu_tests_compiled_$G.txt; grep -E "passed|failed|weight|bias" $W/gpu_tests_compiled_$G.txt | tail -12; pack
timeout 150 python3 benchmarks/probes/pool_chunk_profile.py --models 16 --max-chunk 4 \
  --config benchmarks/configs/cifar10_membership_256_airbench_lean_compile.yaml --out $W/pool_profile_compile_$G.json \
  > $W/pool_profile.log 2>&1
echo "profile rc $? after $((SECONDS-T0)) s"; tail -4 $W/pool_profile.log | cut -c1-600; pack
timeout $(left) python3 benchmarks/membership.py benchmarks/configs/cifar10_membership_256_airbench_lean_compile.yaml \
  --device cuda --name cifar10_membership_256_airbench_lean_compile_warm_$G > $W/pool.log 2>&1
echo "pool rc $? after $((SECONDS-T0)) s"; cp benchmarks/results/membership_cifar10_membership_256_airbench_lean_compile_warm_$G* $W/
grep -E "lira|Pool:|After" $W/pool.log | cut -c1-400; pack
