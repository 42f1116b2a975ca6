#!/bin/bash
# usage: session_1207f_c.sh [SECONDS]   (default 560; carry [".whl", ".data_xz"])
# 2026-12-07 (sixth session; one device call left after failed starts), issue 23 and the GPU suite:
# 1. which setting makes the graphed compiled step's loss NaN (compile_graph_nan.py);
# 2. the full GPU test suite (compile auto included); 3. where roc_analysis's time goes on 12.8M pairs;
# 4. the compile-auto probe (median of epochs) on the pool's setting, probe only, twice.
T=${1:-560}
MARGIN=8
. benchmarks/probes/device_setup.sh
unpack_cifar &
timeout 150 python3 benchmarks/probes/compile_graph_nan.py --out $W/compile_graph_nan_$G.json > $W/compile_graph_nan_$G.txt 2>&1
echo "nan probe rc $? after $((SECONDS-T0)) s"; cut -c1-400 $W/compile_graph_nan_$G.txt; pack
timeout 200 python3 -m pytest -q -s -p no:cacheprovider -m gpu tests/gpu -rs > $W/gpu_tests_$G.txt 2>&1
echo "tests/gpu rc $? after $((SECONDS-T0)) s"; grep -E " passed| failed|^FAILED|compile auto" $W/gpu_tests_$G.txt | cut -c1-400 | tail -8; pack
timeout 90 python3 benchmarks/probes/bootstrap_profile.py --out $W/bootstrap_profile_$G.json > $W/bootstrap_profile_$G.log 2>&1
echo "bootstrap profile rc $? after $((SECONDS-T0)) s"; cat $W/bootstrap_profile_$G.json; tail -2 $W/bootstrap_profile_$G.log; pack
wait
timeout $(left) python3 benchmarks/probes/compile_probe_check.py --reps 2 --out $W/compile_probe_check_$G.json \
  > $W/compile_probe_check_$G.log 2>&1
echo "probe check rc $? after $((SECONDS-T0)) s"; cut -c1-500 $W/compile_probe_check_$G.log | tail -4; pack
