#!/bin/bash
# usage: session_1207f_b.sh [SECONDS]   (default 570; carry [".whl", ".data_xz"])
# 2026-12-07 (sixth session): 1. the full GPU test suite (after the fifth session's refactor of the graph-vs-eager
# tests and this session's probe change); 2. where roc_analysis's time goes on 12.8M pairs (bootstrap_profile.py);
# 3. A/B/A of the compiled pool step with chunks of 4 and 8 (pool_chunk_profile.py, 16 models each), cut to the time left.
T=${1:-570}
MARGIN=8
. benchmarks/probes/device_setup.sh
unpack_cifar &
timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu tests/gpu -rs -x --deselect \
  tests/gpu/test_cuda_factory.py::test_compile_auto_probe_and_the_factory_run_on_cuda > $W/gpu_tests_$G.txt 2>&1
echo "tests/gpu rc $? after $((SECONDS-T0)) s"; grep -E "passed|failed|FAILED|Error" $W/gpu_tests_$G.txt | cut -c1-300 | tail -8; pack
timeout 120 python3 benchmarks/probes/bootstrap_profile.py --out $W/bootstrap_profile_$G.json > $W/bootstrap_profile_$G.log 2>&1
echo "bootstrap profile rc $? after $((SECONDS-T0)) s"; cat $W/bootstrap_profile_$G.json; tail -3 $W/bootstrap_profile_$G.log; pack
wait
for k in 4 8 4; do
  [ $(left 60) -gt 0 ] || break
  timeout $(left) python3 benchmarks/probes/pool_chunk_profile.py --models 16 --max-chunk $k \
    --config benchmarks/configs/cifar10_membership_256_airbench_lean_compile.yaml --out $W/ab_k${k}_$SECONDS.json \
    > $W/ab_k${k}_$SECONDS.log 2>&1
  echo "K=$k rc $? at $((SECONDS-T0)) s"
done
(cd $W && python3 -c "
import glob, json
for f in sorted(glob.glob('ab_k*.json'), key=lambda f: int(f.rsplit('_', 1)[1][:-5])):
    d = json.load(open(f)); print(f, {k: [round(x, 3) for x in v] for k, v in d['per_chunk_s'].items() if v})"); pack
