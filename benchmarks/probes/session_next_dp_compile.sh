#!/bin/bash
# usage: session_next_dp_compile.sh [SECONDS]   (default 560; carry [".whl", ".data_xz"])
# Issue 15 goal 1, prepared 2026-12-07 (eighth session; no device was lent): recipe.compile: true with book-keeping
# DP-SGD (the norms and sums compiled, eager and graphed) timed through the training loop beside the eager and
# graphed fast steps, non-private SGD and Opacus, ResNet-18-GN and the fast CNN; then the GPU test that the compiled
# steps train the eager models. Run after (or instead of) the fixed-shape probe of session_next_1207h.sh.
T=${1:-560}
MARGIN=8
. benchmarks/probes/device_setup.sh
unpack_cifar
timeout $(left 110) python3 benchmarks/dp_throughput.py --device cuda --models resnet18,fastcnn \
  --conv-materialise shift --runs fast,graph,compile,graph-compile --steps 20 --name compile_$G > $W/dp_compile_rows.log 2>&1
echo "dp_throughput rc $? after $((SECONDS-T0)) s"; grep -E "ms/step|Error" $W/dp_compile_rows.log | grep -v "^W1" | cut -c1-300
cp benchmarks/results/dp_throughput_compile_$G.* $W/ 2>/dev/null; pack
timeout $(left) python3 -m pytest -q -s -p no:cacheprovider -m gpu tests/gpu/test_cuda_factory.py \
  -k "compiled_dp_step or graphed_dp_step" -rs > $W/gpu_tests_dp_compile_$G.txt 2>&1
echo "tests rc $? after $((SECONDS-T0)) s"; grep -E " passed| failed|Error|assert" $W/gpu_tests_dp_compile_$G.txt | tail -8; pack
