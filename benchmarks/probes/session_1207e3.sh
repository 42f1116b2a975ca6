#!/bin/bash
# usage: session_1207e3.sh [SECONDS]   (default 400; carry [".whl", ".data_xz", ".ref"])
# Third device call of 2026-12-07 (fifth session), issue 23 side by side on one machine:
# 1. the airbench net, K = 4 loop, CUDA graph with recipe.compile off and on (full 50k, 8 epochs, TTA evaluation);
# 2. the reference airbench94_muon.py (.ref/, not vendored) one model at a time, its max-autotune compile first.
T=${1:-400}
MARGIN=8
. benchmarks/probes/device_setup.sh
unpack_cifar
timeout 150 python3 benchmarks/factory.py --part graph --compile --only "airbench net, airbench-muon, K=4 loop" \
  --name compile_graph_airbench_$G > $W/compile_graph_airbench.log 2>&1
echo "ours rc $? after $((SECONDS-T0)) s"; cp benchmarks/results/factory_graph_compile_graph_airbench_$G.* $W/ 2>/dev/null
grep -E "True" $W/compile_graph_airbench.log | cut -c1-330; pack
timeout $(left) python3 benchmarks/probes/airbench_reference.py --runs 4 --out $W/airbench_reference_$G.json \
  > $W/airbench_reference.log 2>&1
echo "reference rc $? after $((SECONDS-T0)) s"; tail -22 $W/airbench_reference.log | cut -c1-300; pack
