#!/bin/bash
# usage: session_1207j.sh [SECONDS]   (default 560; none of its calls got a machine in the ninth session; carry [".whl", ".data_xz"])
# Ninth session of 2026-12-07: starts failed for most of the device budget, so the two prepared calls
# (session_next_dp_compile.sh, since removed, and session_next_1207i.sh) are folded into one, each part cut to the time left:
# 1. issue 15 goal 1: the compiled DP rows (recipe.compile with book-keeping; eager and graphed) through the training
#    loop beside the fast and graphed steps, non-private SGD and Opacus, ResNet-18-GN and the fast CNN;
# 2. the GPU tests of the compiled DP step and of the background compile with captures paused (issue 23);
# 3. the 256-model lean pool with compile: auto, if the time left holds it (about 300 s on an H100).
T=${1:-560}
MARGIN=8
. benchmarks/probes/device_setup.sh
unpack_cifar
timeout $(left 130) python3 benchmarks/dp_throughput.py --device cuda --models resnet18,fastcnn \
  --conv-materialise shift --runs fast,graph,compile,graph-compile,graph-compile-tf32 --steps 20 --name compile_$G > $W/dp_compile_rows.log 2>&1
echo "dp_throughput rc $? after $((SECONDS-T0)) s"; grep -E "ms/step|Error" $W/dp_compile_rows.log | grep -v "^W1" | cut -c1-300
cp benchmarks/results/dp_throughput_compile_$G.* $W/ 2>/dev/null; pack
gpu_tests 1207j 190 "compiled_dp_step or compile_auto or while_the_step_compiles or tf32_conv_norms_with"
if [ $(left) -gt 300 ]; then
  run_pool cifar10_membership_256_airbench_lean_auto cifar10_membership_256_airbench_lean_auto_paused_$G $(left)
else
  echo "pool skipped: $(left) s left"
fi
