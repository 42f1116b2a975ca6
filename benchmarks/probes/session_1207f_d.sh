#!/bin/bash
# usage: session_1207f_d.sh   (carry [".whl"]); 2026-12-07 sixth session, the last ~100 s of device time:
# the GPU test of compile: auto in fp32 and bf16 after fastcnn's global max pool moved to float32.
T=${1:-100}
. benchmarks/probes/device_setup.sh
timeout $(left 3) python3 -m pytest -q -s -p no:cacheprovider -m gpu tests/gpu/test_cuda_factory.py -k "compile_auto" -rs \
  > $W/gpu_test_compile_auto_$G.txt 2>&1
echo "test rc $? after $((SECONDS-T0)) s"; grep -E " passed| failed|compile auto" $W/gpu_test_compile_auto_$G.txt | cut -c1-400 | tail -5; pack
