#!/bin/bash
# usage: session_1207_device.sh [SECONDS]   (default 585; carry [".whl", ".data_xz"])
# The 2026-12-07 (second session) device call, in priority order, each part cut to the time left:
# 1. tests/gpu (the attention / text-inversion / book-keeping-through-attention / TF32 conv-norm tests);
# 2. the DP step with the conv-norm matmuls in TF32 (`tf32norms`, opt-in; TF32 was the default when this ran) and graphed,
#    ResNet-18-GN and the fast CNN, Opacus beside;
# 3. the issue-16 evasion benchmark after the early-stop drop-rule change (9 alternating calls per library);
# 4. the FGSM timeline probe with the lead breakdown;
# 5. the vit-mha / lstm DP timings.
T=${1:-585}
MARGIN=10
. benchmarks/probes/device_setup.sh
unpack_cifar
nvidia-smi --query-gpu=name --format=csv,noheader | tee $W/gpu.txt
timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/gpu -rs > $W/gpu_tests_$G.txt 2>&1
echo "tests/gpu rc $? after $((SECONDS-T0)) s" | tee -a $W/gpu_tests_$G.txt; tail -3 $W/gpu_tests_$G.txt; pack
DP=$(left); [ $DP -gt 160 ] && DP=160
timeout $DP python3 benchmarks/dp_throughput.py --device cuda --models resnet18,fastcnn --conv-materialise unfold \
    --runs fast,tf32norms,graph --name tf32norms_$G > $W/dp_tf32norms.log 2>&1
echo "dp tf32norms rc $? after $((SECONDS-T0)) s"; cp benchmarks/results/dp_throughput_tf32norms_$G.* $W/ 2>/dev/null; pack
grep -E "ms/step" $W/dp_tf32norms.log | head -20
[ $(left) -gt 200 ] && timeout $(left 40) python3 benchmarks/evasion.py --dataset cifar10 --device cuda --models resnet18 --examples 1000 \
  --eps 8/255 --eps-l2 0.5 --steps 50 \
  --recipe '{"name":"airbench","epochs":10,"label_smoothing":0.0,"augment":{"crop_pad":4,"flip":true}}' \
  --adversarial 8/255 --adv-steps 7 --attacks "FGSM linf;PGD-20 linf;PGD-10 l2;APGD-CE-50 linf" --repeats 9 \
  --name cifar10_resnet18_at10_dropcost_$G > $W/evasion.log 2>&1
echo "evasion rc $? after $((SECONDS-T0)) s"; cp benchmarks/results/evasion_cifar10_resnet18_at10_dropcost_$G.* $W/ 2>/dev/null; pack
grep -E "ours|clean" $W/evasion.log | tail -12
if [ $(left) -gt 30 ]; then
  timeout $(left) python3 benchmarks/probes/fgsm_timeline.py --examples 1000 --reps 21 --out $W/fgsm_timeline_$G.txt > /dev/null 2>&1
  echo "timeline rc $? after $((SECONDS-T0)) s"; cat $W/fgsm_timeline_$G.txt; pack
fi
if [ $(left) -gt 60 ]; then
  timeout $(left) python3 benchmarks/dp_throughput.py --device cuda --models vit-mha,lstm --runs per-example,fast,graph \
      --synthetic --name open_items_$G > $W/dp_open_items.log 2>&1
  echo "dp open_items rc $? after $((SECONDS-T0)) s"; cp benchmarks/results/dp_throughput_open_items_$G.* $W/ 2>/dev/null; pack
  grep -E "ms/step" $W/dp_open_items.log | head -20
fi
