#!/bin/bash
# usage: session_1207_quick_device.sh [SECONDS]   (default 110; carry [".whl"])
# A short follow-up to session_1207_device.sh: the GPU tests written after it (LSTM on CUDA, TF32 against IEEE conv
# norms), the FGSM timeline after x + delta moved before the end-of-call reads, and the LSTM's DP step timings.
T=${1:-110}
MARGIN=5
. benchmarks/probes/device_setup.sh
timeout 45 python3 -m pytest -q -p no:cacheprovider -m gpu -rs tests/gpu/test_cuda_fastclip_attention.py \
  "tests/gpu/test_cuda_factory.py::test_tf32_conv_norms_stay_within_tf32_rounding_of_ieee_norms" > $W/gpu_tests_$G.txt 2>&1
echo "tests rc $? after $((SECONDS-T0)) s" | tee -a $W/gpu_tests_$G.txt; tail -3 $W/gpu_tests_$G.txt; pack
timeout $(( $(left) / 2 )) python3 benchmarks/probes/fgsm_timeline.py --examples 1000 --reps 21 --out $W/fgsm_timeline_$G.txt > /dev/null 2>&1
echo "timeline rc $? after $((SECONDS-T0)) s"; cat $W/fgsm_timeline_$G.txt; pack
timeout $(left) python3 benchmarks/dp_throughput.py --device cuda --models lstm --runs per-example,fast --steps 10 \
  --synthetic --name lstm_$G > $W/dp_lstm.log 2>&1
echo "dp lstm rc $? after $((SECONDS-T0)) s"; cp benchmarks/results/dp_throughput_lstm_$G.* $W/ 2>/dev/null; pack
grep -E "ms/step|rror" $W/dp_lstm.log | head
