#!/bin/bash
# usage: session_1208e.sh [SECONDS]   (default 420; carry [".whl", ".data_xz"])
# Prepared 2026-12-08, issue 23 goal 2 (256 pool models in 240 s; best so far 273.6 s on an H100, chunks of 4 with the
# graph of the compiled step): are chunks of 8 faster per model than chunks of 4 with the compiled step? Eager-graphed,
# K = 8 trained 0.931 s per model against 0.956 at K = 4 (H100, 2026-12-07, pool_profile_k4/k8); compiled, K = 8 was
# never timed. 32 models of the lean compiled pool config per run, K = 4 / 8 / 8 / 4 on one machine; compare
# per_model_s_after_first_chunk (the first chunk holds the compile).
T=${1:-420}
MARGIN=8
. benchmarks/probes/device_setup.sh
unpack_cifar
for k in 4 8 8 4; do
  [ $(left) -lt 70 ] && { echo "stopped before K=$k: $(left) s left"; break; }
  i=$((${i:-0} + 1))
  timeout $(left) python3 benchmarks/probes/pool_chunk_profile.py --models 32 --max-chunk $k \
    --config benchmarks/configs/cifar10_membership_256_airbench_lean_compile.yaml \
    --out $W/pool_profile_compile_${i}_k${k}_$G.json > $W/pool_profile_compile_${i}_k${k}_$G.log 2>&1
  echo "$i K=$k rc $? after $((SECONDS-T0)) s: $(python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(d['train_wall_s'], {k: round(v, 3) for k, v in d['per_model_s_after_first_chunk'].items()})" $W/pool_profile_compile_${i}_k${k}_$G.json 2>&1 | tail -1)"
  pack
done
