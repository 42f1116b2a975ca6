#!/bin/bash
# usage: session_1207c_device.sh [SECONDS]   (default 590; carry [".whl", ".data_xz"])
# The 2026-12-07 third-session first device call (issue 23):
# 1. where a LiRA pool model's time goes: pool_chunk_profile.py, 16 airbench models, K = 4 and K = 8 (train /
#    TTA evaluation / float32 and bf16 queries, and bf16's error on LiRA's statistic);
# 2. the 256-model airbench pool with bf16 queries, at the K whose train + evaluate + bf16 query time per model
#    was lower in part 1.
T=${1:-590}
MARGIN=8
. benchmarks/probes/device_setup.sh
unpack_cifar
nvidia-smi --query-gpu=name --format=csv,noheader | tee $W/gpu.txt
for K in 4 8; do
  timeout 75 python3 benchmarks/probes/pool_chunk_profile.py --models 16 --max-chunk $K \
    --out $W/pool_profile_k${K}_$G.json > $W/pool_profile_k${K}.log 2>&1
  echo "pool profile K=$K rc $? after $((SECONDS-T0)) s"; tail -14 $W/pool_profile_k${K}.log; pack
done
K=$(python3 - <<'PY'
import json, glob
best = (float("inf"), 4)
for f in glob.glob("/tmp/w/pool_profile_k*_*.json"):
    d = json.load(open(f)); p = d["per_model_s_after_first_chunk"]
    best = min(best, (p["train"] + p["evaluate"] + p["query_bf16"], d["max_chunk"]))
print(best[1])
PY
)
echo "pool K=$K"
sed "s/max_chunk: 4/max_chunk: $K/" benchmarks/configs/cifar10_membership_256_airbench_bf16q.yaml > /tmp/pool256.yaml
timeout $(left) python3 benchmarks/membership.py /tmp/pool256.yaml --device cuda \
  --name cifar10_membership_256_airbench_bf16q_k${K}_$G > $W/pool256.log 2>&1
echo "pool rc $? after $((SECONDS-T0)) s"; cp benchmarks/results/membership_cifar10_membership_256_airbench_bf16q_k${K}_$G.* $W/ 2>/dev/null
tail -12 $W/pool256.log; pack
