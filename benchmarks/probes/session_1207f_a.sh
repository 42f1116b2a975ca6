#!/bin/bash
# usage: session_1207f_a.sh [SECONDS]   (default 570; carry [".whl", ".data_xz"])
# 2026-12-07 (sixth session), issue 23: 1. which setting makes the graphed compiled step's loss NaN
# (compile_graph_nan.py, variants in parallel processes); 2. the compile-auto GPU test alone in a fresh process;
# 3. the 256-model lean pool with compile: auto and the median-of-epochs probe.
T=${1:-570}
MARGIN=8
. benchmarks/probes/device_setup.sh
unpack_cifar &
timeout 200 python3 benchmarks/probes/compile_graph_nan.py --out $W/compile_graph_nan_$G.json > $W/compile_graph_nan_$G.txt 2>&1
echo "nan probe rc $? after $((SECONDS-T0)) s"; cut -c1-600 $W/compile_graph_nan_$G.txt; pack
timeout 120 python3 -m pytest -q -s -p no:cacheprovider -m gpu tests/gpu/test_cuda_factory.py -k "compile_auto" -rs \
  > $W/gpu_test_compile_auto_$G.txt 2>&1
echo "test rc $? after $((SECONDS-T0)) s"; grep -E "passed|failed|compile auto" $W/gpu_test_compile_auto_$G.txt | cut -c1-500 | tail -4; pack
wait
timeout $(left) python3 benchmarks/membership.py benchmarks/configs/cifar10_membership_256_airbench_lean_auto.yaml \
  --device cuda --name cifar10_membership_256_airbench_lean_auto_median_$G > $W/pool_auto.log 2>&1
echo "pool rc $? after $((SECONDS-T0)) s"; cp benchmarks/results/membership_cifar10_membership_256_airbench_lean_auto_median_$G.* $W/ 2>/dev/null
grep -E "lira|Pool:|After" $W/pool_auto.log | cut -c1-400
python3 -c "import json; print(json.load(open('$W/membership_cifar10_membership_256_airbench_lean_auto_median_$G.json'))['cost']['training_paths'])"; pack
