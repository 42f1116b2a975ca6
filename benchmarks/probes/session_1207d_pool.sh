#!/bin/bash
# usage: session_1207d_pool.sh K [SECONDS]   (default 590; carry [".whl", ".data_xz"])
# Second device call (2026-12-07, fourth session): the 256-model airbench LiRA pool with bf16 queries and accuracy from the test logits at chunk K
# (the K that session_1207d_profile.sh found faster), through benchmarks/membership.py.
K=${1:-4}
T=${2:-590}
MARGIN=8
. benchmarks/probes/device_setup.sh
unpack_cifar
sed "s/max_chunk: 4/max_chunk: $K/" benchmarks/configs/cifar10_membership_256_airbench_lean.yaml > /tmp/pool256.yaml
timeout $(left) python3 benchmarks/membership.py /tmp/pool256.yaml --device cuda \
  --name cifar10_membership_256_airbench_lean_k${K}_$G > $W/pool256.log 2>&1
echo "pool rc $? after $((SECONDS-T0)) s"; cp benchmarks/results/membership_cifar10_membership_256_airbench_lean_k${K}_$G.* $W/ 2>/dev/null
tail -12 $W/pool256.log; pack
