#!/bin/bash
# usage: session_1207g_short.sh [SECONDS]   (default 230; carry [".whl", ".data_xz"])
# 2026-12-07 (seventh session), what fits the session's last ~6 device minutes (the 256-model pool of
# session_1207g.sh did not): the background compile of compile: auto in a 32-model pool (per chunk: eager while
# compiling, then compiled; compile_background_probe.py), then its two GPU tests.
T=${1:-230}
MARGIN=6
. benchmarks/probes/device_setup.sh
unpack_cifar
timeout $(left 80) python3 benchmarks/probes/compile_background_probe.py --models 32 --out $W/compile_background_$G.json \
  > $W/compile_background_$G.log 2>&1
echo "probe rc $? after $((SECONDS-T0)) s"; tail -14 $W/compile_background_$G.log | cut -c1-400; pack
timeout $(left) python3 -m pytest -q -s -p no:cacheprovider -m gpu tests/gpu/test_cuda_factory.py -k "compile_auto or while_the_step_compiles" -rs \
  > $W/gpu_tests_compile_bg_$G.txt 2>&1
echo "tests rc $? after $((SECONDS-T0)) s"; grep -E " passed| failed|compile auto|Error|assert" $W/gpu_tests_compile_bg_$G.txt | cut -c1-400 | tail -12; pack
