#!/bin/bash
# usage: session_1207d_more.sh [SECONDS]   (default 500; carry [".whl", ".data_xz"])
# Third device call (2026-12-07, fourth session):
# 1. issue 23: the lean 256-model pool with 5 epochs per model instead of 8 (the speed / strength trade-off);
# 2. issue 15, in the time left: the graphed DP step with the default (IEEE) conv norms next to the eager one and
#    TF32 norms, in one run with Opacus (ResNet-18-GN, fast CNN; CIFAR-10 (JPEG)).
T=${1:-500}
MARGIN=8
. benchmarks/probes/device_setup.sh
unpack_cifar
timeout $(left) python3 benchmarks/membership.py benchmarks/configs/cifar10_membership_256_airbench_lean_5ep.yaml \
  --device cuda --name cifar10_membership_256_airbench_lean_5ep_$G > $W/pool5.log 2>&1
echo "pool rc $? after $((SECONDS-T0)) s"; cp benchmarks/results/membership_cifar10_membership_256_airbench_lean_5ep_$G.* $W/ 2>/dev/null
tail -10 $W/pool5.log; pack
timeout $(left) python3 benchmarks/dp_throughput.py --device cuda --models resnet18,fastcnn --runs fast,graph,tf32norms \
  --name graph_ieee_$G > $W/dp_graph.log 2>&1
echo "dp rc $? after $((SECONDS-T0)) s"; cp benchmarks/results/dp_throughput_graph_ieee_$G.* $W/ 2>/dev/null
grep -E "ms/step|rror" $W/dp_graph.log | head -30; pack
