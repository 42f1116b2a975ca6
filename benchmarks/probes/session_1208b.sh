#!/bin/bash
# usage: session_1208b.sh [SECONDS]   (default 560; carry [".whl", ".data_xz"])
# Prepared 2026-12-08 for the next device call, issue 15 goal 1 after the compiled DP rows were timed through the loop
# on an H100 (ResNet-18-GN 1.56x IEEE / 1.42x TF32, fast CNN 1.81x, ViT-small 1.19x; docs/privacy.md):
# 1. the fast CNN first (the model furthest from 1.5x): the graphed compiled DP step in IEEE, TF32 and bf16 autocast,
#    each with only the norms and sums compiled and with the recording forward and backward compiled too
#    (fastclip.COMPILE_RECORD, "-all"), the like-for-like references (mlaudit_sgd_tf32 for the TF32 rows,
#    mlaudit_sgd_recipe for bf16) and Opacus beside; one results file per model, so a timeout keeps what ran;
# 2. ResNet-18-GN, then ViT-small, the same runs, as time allows;
# 3. in the time left, the GPU tests of the compiled DP step (both variants), the DP compile probe and the
#    background compile.
T=${1:-560}
MARGIN=8
. benchmarks/probes/device_setup.sh
unpack_cifar
RUNS=graph-compile,graph-compile-tf32,graph-compile-bf16,graph-compile-all,graph-compile-all-tf32,graph-compile-all-bf16
for model in fastcnn resnet18 vit; do
  [ $(left 150) -lt 60 ] && { echo "stopped before $model: $(left) s left"; break; }
  timeout $(left 150) python3 benchmarks/dp_throughput.py --device cuda --models $model --conv-materialise shift \
    --runs $RUNS --steps 20 --name compile_all_${model}_$G > $W/dp_all_$model.log 2>&1
  echo "dp_throughput $model rc $? after $((SECONDS-T0)) s"
  grep -E "ms/step|Error" $W/dp_all_$model.log | grep -v "^W1" | cut -c1-300
  cp benchmarks/results/dp_throughput_compile_all_${model}_$G.* $W/ 2>/dev/null; pack
done
gpu_tests 1208b 150 "while_the_step_compiles or probes_a_dp_job or compiled_dp_step"
