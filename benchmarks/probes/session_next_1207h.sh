#!/bin/bash
# usage: session_next_1207h.sh [SECONDS]   (default 600; carry [".whl", ".data_xz"])
# 2026-12-07 (eighth session; ran once on an H100): the seventh session's unrun script (issue 23: the 256-model lean pool with compile: auto and the
# background compile, its GPU tests, the per-chunk probe) with, first, issue 15's first torch.compile probe: fast
# clipping's norms and sums compiled as one graph (benchmarks/probes/dp_compile_probe.py; ResNet-18-GN and the fast
# CNN at 288 slots, fp32) against the eager sums and the non-private fp32 step. Each part gets what time is left.
T=${1:-600}
MARGIN=8
. benchmarks/probes/device_setup.sh
unpack_cifar &
timeout 130 python3 benchmarks/probes/dp_compile_probe.py --slots 288 --out $W/dp_compile_$G.json > $W/dp_compile_$G.log 2>&1
echo "dp probe rc $? after $((SECONDS-T0)) s"; grep -v "^W1" $W/dp_compile_$G.log | tail -6 | cut -c1-500; pack
wait
timeout $(left 20) python3 benchmarks/membership.py benchmarks/configs/cifar10_membership_256_airbench_lean_auto.yaml \
  --device cuda --name cifar10_membership_256_airbench_lean_auto_bg_$G > $W/pool_auto_bg.log 2>&1
echo "pool rc $? after $((SECONDS-T0)) s"
cp benchmarks/results/membership_cifar10_membership_256_airbench_lean_auto_bg_$G.* $W/ 2>/dev/null
grep -E "lira|Pool:|After" $W/pool_auto_bg.log | cut -c1-300
python3 -c "import json; print(json.load(open('$W/membership_cifar10_membership_256_airbench_lean_auto_bg_$G.json'))['cost']['training_paths'])"
pack
L=$(left); [ $L -gt 100 ] && L=100
timeout $L python3 -m pytest -q -s -p no:cacheprovider -m gpu tests/gpu/test_cuda_factory.py \
  -k "compile_auto or while_the_step_compiles" -rs > $W/gpu_tests_compile_bg_$G.txt 2>&1
echo "tests rc $? after $((SECONDS-T0)) s"
grep -E " passed| failed|compile auto|Error|assert" $W/gpu_tests_compile_bg_$G.txt | cut -c1-400 | tail -12; pack
timeout $(left) python3 benchmarks/probes/compile_background_probe.py --models 24 --out $W/compile_background_$G.json \
  > $W/compile_background_$G.log 2>&1
echo "probe rc $? after $((SECONDS-T0)) s"; tail -12 $W/compile_background_$G.log | cut -c1-400; pack
