#!/bin/bash
# usage: session_next_1207f.sh [SECONDS]   (default 560; carry [".whl", ".data_xz"])
# Ran on an H100 in the seventh session, 2026-12-07 (benchmarks/results/compile_zoo_sweep_h100.md,
# gpu_tests_2026-12-07_seventh_compile_h100.txt, membership_cifar10_membership_256_airbench_lean_auto_checked_h100.md).
# Prepared 2026-12-07 (sixth session) for the next device call, issue 23 goals 2 and 5:
# 1. every zoo model through the compiled call under bf16 autocast (compile_zoo_sweep.py; fastcnn's global max pool
#    moved to float32 after its compiled bf16 gradients were NaN): no non-finite gradient expected; 2. the GPU tests of the compiled graph and of compile: auto (fp32 and bf16);
# 3. the 256-model lean pool with compile: auto (median-of-epochs probe and the loss agreement check: the reason in
#    results.json cost.training_paths should say "compiled" with both timings; "losses differ" would mean
#    COMPILE_LOSS_RTOL is too tight for airbench-muon). On an H200 if one comes: the goal's GPU.
T=${1:-560}
MARGIN=8
. benchmarks/probes/device_setup.sh
unpack_cifar &
timeout 150 python3 benchmarks/probes/compile_zoo_sweep.py --device cuda --parallel 10 --out $W/compile_zoo_sweep_$G.json > $W/compile_zoo_sweep_$G.txt 2>&1
echo "zoo sweep rc $? after $((SECONDS-T0)) s"; cut -c1-300 $W/compile_zoo_sweep_$G.txt; pack
timeout 150 python3 -m pytest -q -s -p no:cacheprovider -m gpu tests/gpu/test_cuda_factory.py -k "compile" -rs \
  > $W/gpu_tests_compile_$G.txt 2>&1
echo "tests rc $? after $((SECONDS-T0)) s"; grep -E " passed| failed|compile auto" $W/gpu_tests_compile_$G.txt | cut -c1-400 | tail -6; pack
wait
timeout $(left) python3 benchmarks/membership.py benchmarks/configs/cifar10_membership_256_airbench_lean_auto.yaml \
  --device cuda --name cifar10_membership_256_airbench_lean_auto_checked_$G > $W/pool_auto.log 2>&1
echo "pool rc $? after $((SECONDS-T0)) s"; cp benchmarks/results/membership_cifar10_membership_256_airbench_lean_auto_checked_$G.* $W/ 2>/dev/null
grep -E "lira|Pool:|After" $W/pool_auto.log | cut -c1-400
python3 -c "import json; print(json.load(open('$W/membership_cifar10_membership_256_airbench_lean_auto_checked_$G.json'))['cost']['training_paths'])"; pack
