#!/bin/bash
# usage: session_next_pool2.sh [SECONDS]   (default 560; carry [".whl", ".data_xz"])
# Prepared 2026-12-07 (fifth session) for a next device call (after session_next_pool1.sh), issue 23 goal 2,
# each part cut to the time left:
# 1. where roc_analysis's time goes for one attack of 12.8M pairs (bootstrap_profile.py);
# 2. A/B in one call: the compiled pool step with chunks of 4 and of 8 (pool_chunk_profile.py, 16 models each);
# 3. the 256-model lean compiled pool at 5 epochs (a trade-off: not the recipe the goal names; report it as such).
# Part 1 ran on an H100 on 2026-12-07 (sixth session): benchmarks/results/bootstrap_profile_h100.md; parts 2-3 not yet.
T=${1:-560}
MARGIN=8
. benchmarks/probes/device_setup.sh
unpack_cifar
timeout 120 python3 benchmarks/probes/bootstrap_profile.py --out $W/bootstrap_profile_$G.json > /dev/null 2>&1
echo "bootstrap profile rc $? after $((SECONDS-T0)) s"; cat $W/bootstrap_profile_$G.json; pack
for k in 4 8 4; do
  timeout $(left 300) python3 benchmarks/probes/pool_chunk_profile.py --models 16 --max-chunk $k \
    --config benchmarks/configs/cifar10_membership_256_airbench_lean_compile.yaml --out $W/ab_k${k}_$SECONDS.json \
    > /dev/null 2>&1
  echo "K=$k rc $? at $((SECONDS-T0)) s"
done
(cd $W && python3 -c "
import glob, json
for f in sorted(glob.glob('ab_k*.json'), key=lambda f: int(f.rsplit('_', 1)[1][:-5])):
    d = json.load(open(f)); print(f, {k: [round(x, 3) for x in v] for k, v in d['per_chunk_s'].items() if v})"); pack
timeout $(left) python3 benchmarks/membership.py benchmarks/configs/cifar10_membership_256_airbench_lean_compile_5ep.yaml \
  --device cuda --name cifar10_membership_256_airbench_lean_compile_5ep_$G > $W/pool5.log 2>&1
echo "pool rc $? after $((SECONDS-T0)) s"; cp benchmarks/results/membership_cifar10_membership_256_airbench_lean_compile_5ep_$G.* $W/ 2>/dev/null
grep -E "lira|Pool:|After" $W/pool5.log | cut -c1-400; pack
