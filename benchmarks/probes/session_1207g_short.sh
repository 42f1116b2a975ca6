#!/bin/bash
# usage: session_1207g_short.sh [SECONDS]   (default 170; carry [".whl", ".data_xz"])
# 2026-12-07 (seventh session), what fits the session's last device minutes (the 256-model pool of session_1207g.sh
# did not): the two GPU tests of the background compile of compile: auto, then, in the time left, the background
# compile in a 24-model pool (per chunk: eager while compiling, then compiled; compile_background_probe.py).
T=${1:-170}
MARGIN=5
. benchmarks/probes/device_setup.sh
unpack_cifar &
timeout 90 python3 -m pytest -q -s -p no:cacheprovider -m gpu tests/gpu/test_cuda_factory.py -k "compile_auto or while_the_step_compiles" -rs \
  > $W/gpu_tests_compile_bg_$G.txt 2>&1
echo "tests rc $? after $((SECONDS-T0)) s"; grep -E " passed| failed|compile auto|Error|assert" $W/gpu_tests_compile_bg_$G.txt | cut -c1-400 | tail -12; pack
wait
timeout $(left) python3 benchmarks/probes/compile_background_probe.py --models 24 --out $W/compile_background_$G.json \
  > $W/compile_background_$G.log 2>&1
echo "probe rc $? after $((SECONDS-T0)) s"; tail -14 $W/compile_background_$G.log | cut -c1-400; pack
