#!/bin/bash
# usage: session_1207d_profile.sh [SECONDS]   (default 300; carry [".whl", ".data_xz"])
# First of two device calls (2026-12-07, fourth session): the pool-model time profile at K = 4 and K = 8
# (pool_chunk_profile.py; the 256-model pool gets a whole call of its own, session_1207d_pool.sh), then the short
# follow-up items of session_1207_quick_device.sh (LSTM / TF32 GPU tests, FGSM timeline, LSTM DP timings).
T=${1:-300}
MARGIN=5
. benchmarks/probes/device_setup.sh
unpack_cifar
nvidia-smi --query-gpu=name --format=csv,noheader | tee $W/gpu.txt
for K in 4 8; do
  timeout 75 python3 benchmarks/probes/pool_chunk_profile.py --models 16 --max-chunk $K \
    --out $W/pool_profile_k${K}_$G.json > $W/pool_profile_k${K}.log 2>&1
  echo "pool profile K=$K rc $? after $((SECONDS-T0)) s"; tail -14 $W/pool_profile_k${K}.log; pack
done
bash benchmarks/probes/session_1207_quick_device.sh $(left) 2>&1 | tail -30
