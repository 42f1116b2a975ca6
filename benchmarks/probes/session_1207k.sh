#!/bin/bash
# usage: session_1207k.sh [SECONDS]   (default 250; carry [".whl", ".data_xz"])
# Ninth session of 2026-12-07, the last device call it could afford after failed starts: issue 15 goal 1 only,
# the compiled DP rows through the training loop, ResNet-18-GN first (Opacus and non-private SGD beside), then the
# fast CNN and the compiled-DP GPU test in whatever time is left.
T=${1:-250}
MARGIN=6
. benchmarks/probes/device_setup.sh
unpack_cifar
for m in resnet18 fastcnn; do
  [ $(left) -gt 40 ] || break
  timeout $(left) python3 benchmarks/dp_throughput.py --device cuda --models $m --conv-materialise shift \
    --runs fast,graph,compile,graph-compile,graph-compile-tf32 --steps 20 --name compile_${m}_$G > $W/dp_compile_$m.log 2>&1
  echo "$m rc $? after $((SECONDS-T0)) s"; grep -E "ms/step|Error" $W/dp_compile_$m.log | grep -v "^W1" | cut -c1-300
  cp benchmarks/results/dp_throughput_compile_${m}_$G.* $W/ 2>/dev/null; pack
done
if [ $(left) -gt 60 ]; then
  timeout $(left) python3 -m pytest -q -s -p no:cacheprovider -m gpu tests/gpu/test_cuda_factory.py \
    -k "compiled_dp_step" -rs > $W/gpu_tests_1207k_$G.txt 2>&1
  echo "tests rc $? after $((SECONDS-T0)) s"; grep -E " passed| failed|Error|assert" $W/gpu_tests_1207k_$G.txt | tail -6; pack
fi
