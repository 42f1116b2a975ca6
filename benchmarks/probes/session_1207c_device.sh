#!/bin/bash
# usage: session_1207c_device.sh [SECONDS]   (default 420; carry [".whl", ".data_xz"])
# The 2026-12-07 third-session first device call:
# 1. where a LiRA pool model's time goes (issue 23): pool_chunk_profile.py, 16 airbench models, K = 4 and K = 8;
# 2. the GPU tests written after the last call (LSTM on CUDA, TF32 against IEEE conv norms);
# 3. the FGSM timeline after x + delta moved before the end-of-call reads (issue 16);
# 4. the LSTM's DP step timings (issue 15).
T=${1:-420}
MARGIN=8
. benchmarks/probes/device_setup.sh
unpack_cifar
nvidia-smi --query-gpu=name --format=csv,noheader | tee $W/gpu.txt
for K in 4 8; do
  timeout $(( $(left) / 3 )) python3 benchmarks/probes/pool_chunk_profile.py --models 16 --max-chunk $K \
    --out $W/pool_profile_k${K}_$G.json > $W/pool_profile_k${K}.log 2>&1
  echo "pool profile K=$K rc $? after $((SECONDS-T0)) s"; tail -14 $W/pool_profile_k${K}.log; pack
done
timeout 60 python3 -m pytest -q -p no:cacheprovider -m gpu -rs tests/gpu/test_cuda_fastclip_attention.py \
  "tests/gpu/test_cuda_factory.py::test_tf32_conv_norms_stay_within_tf32_rounding_of_ieee_norms" > $W/gpu_tests_$G.txt 2>&1
echo "tests rc $? after $((SECONDS-T0)) s" | tee -a $W/gpu_tests_$G.txt; tail -3 $W/gpu_tests_$G.txt; pack
timeout $(( $(left) / 2 )) python3 benchmarks/probes/fgsm_timeline.py --examples 1000 --reps 21 --out $W/fgsm_timeline_$G.txt > /dev/null 2>&1
echo "timeline rc $? after $((SECONDS-T0)) s"; cat $W/fgsm_timeline_$G.txt; pack
timeout $(left) python3 benchmarks/dp_throughput.py --device cuda --models lstm --runs per-example,fast --steps 10 \
  --synthetic --name lstm_$G > $W/dp_lstm.log 2>&1
echo "dp lstm rc $? after $((SECONDS-T0)) s"; cp benchmarks/results/dp_throughput_lstm_$G.* $W/ 2>/dev/null; pack
grep -E "ms/step|rror" $W/dp_lstm.log | head
