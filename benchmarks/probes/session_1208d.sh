#!/bin/bash
# usage: session_1208d.sh [SECONDS]   (default 560; carry [".whl", ".data_xz"])
# Prepared 2026-12-08, after session_1208b.sh (the fast CNN's compiled DP rows), issue 15 goal 1:
# 1. per layer, whether fast clipping's cost rule picks the fastest way (ghost / materialise, shifted / unfolded convs),
#    eagerly and with each way compiled (benchmarks/probes/dp_rule_oracle.py): ResNet-18-GN first (1.56x in IEEE
#    float32 on an H100, near the goal), then the fast CNN; written layer by layer, so a timeout keeps what ran;
# 2. ResNet-18-GN's compiled DP rows as session_1208b.sh timed the fast CNN's, then ViT-small's, as time allows.
T=${1:-560}
MARGIN=8
. benchmarks/probes/device_setup.sh
unpack_cifar
timeout $(left 300) python3 benchmarks/probes/dp_rule_oracle.py --device cuda --compile --models resnet18,fastcnn \
  --out $W/dp_rule_oracle_$G.json > $W/dp_rule_oracle_$G.log 2>&1
echo "oracle rc $? after $((SECONDS-T0)) s"; grep -E "^(resnet18|fastcnn) \{" $W/dp_rule_oracle_$G.log; pack
RUNS=graph-compile,graph-compile-tf32,graph-compile-all,graph-compile-all-tf32
dp_model resnet18 10 $RUNS
dp_model vit 10 $RUNS
