#!/bin/bash
# usage: session_1208b.sh [SECONDS]   (default 560; carry [".whl", ".data_xz"])
# Prepared 2026-12-08 for the next device call, issue 15 goal 1 after the compiled DP rows were timed through the loop
# on an H100 (ResNet-18-GN 1.56x IEEE / 1.42x TF32, fast CNN 1.81x, ViT-small 1.19x; docs/privacy.md):
# 1. the graphed compiled DP step in IEEE, TF32 and bf16 autocast for the three models, with the like-for-like
#    references (mlaudit_sgd_tf32 for the TF32 rows, mlaudit_sgd_recipe for bf16) and Opacus beside;
#    on an H200 if one comes (the goal's GPU; none has come for these rows yet);
# 2. in the time left, the GPU tests of the DP compile probe and of the background compile.
T=${1:-560}
MARGIN=8
. benchmarks/probes/device_setup.sh
unpack_cifar
timeout $(left 100) python3 benchmarks/dp_throughput.py --device cuda --models resnet18,fastcnn,vit \
  --conv-materialise shift --runs graph-compile,graph-compile-tf32,graph-compile-bf16 --steps 20 \
  --name compile_precisions_$G > $W/dp_precisions.log 2>&1
echo "dp_throughput rc $? after $((SECONDS-T0)) s"; grep -E "ms/step|Error" $W/dp_precisions.log | grep -v "^W1" | cut -c1-300
cp benchmarks/results/dp_throughput_compile_precisions_$G.* $W/ 2>/dev/null; pack
gpu_tests 1208b 150 "while_the_step_compiles or probes_a_dp_job or compiled_dp_step"
