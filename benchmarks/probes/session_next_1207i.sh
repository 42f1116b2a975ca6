#!/bin/bash
# usage: session_next_1207i.sh [SECONDS]   (default 560; carry [".whl", ".data_xz"])
# Prepared 2026-12-07 (eighth session) for the next device call, issue 23 goals 2 and 5. On that session's H100 the
# background compile of compile: auto failed beside the chunks' CUDA graph captures (329.0 s of training); since
# then no capture runs while the compile thread works (graphed.pause_captures), and the ROC analyses run one after
# the other on a GPU again. Here:
# 1. the two GPU tests of the background compile (they now fail if the compile fails or a chunk captured beside it);
# 2. the 256-model lean pool with compile: auto: compare 251.9 s training / 275.4 s whole (compile inside the probe,
#    H100, ..._lean_auto_checked_h100.md); cost.training_paths should show "captures paused" chunks, then compiled;
# 3. in the time left, the per-chunk record (compile_background_probe.py).
# Then benchmarks/probes/session_1207j.sh (issue 15) in another call. On an H200 if one comes.
T=${1:-560}
MARGIN=8
. benchmarks/probes/device_setup.sh
unpack_cifar &
timeout 110 python3 -m pytest -q -s -p no:cacheprovider -m gpu tests/gpu/test_cuda_factory.py \
  -k "compile_auto or while_the_step_compiles" -rs > $W/gpu_tests_compile_bg_$G.txt 2>&1
echo "tests rc $? after $((SECONDS-T0)) s"
grep -E " passed| failed|compile auto|paused|Error|assert" $W/gpu_tests_compile_bg_$G.txt | cut -c1-400 | tail -14; pack
wait
timeout $(left 40) python3 benchmarks/membership.py benchmarks/configs/cifar10_membership_256_airbench_lean_auto.yaml \
  --device cuda --name cifar10_membership_256_airbench_lean_auto_paused_$G > $W/pool_auto_paused.log 2>&1
echo "pool rc $? after $((SECONDS-T0)) s"
cp benchmarks/results/membership_cifar10_membership_256_airbench_lean_auto_paused_$G.* $W/ 2>/dev/null
grep -E "lira|Pool:|After|Warning" $W/pool_auto_paused.log | cut -c1-300
python3 -c "import json; print(json.load(open('$W/membership_cifar10_membership_256_airbench_lean_auto_paused_$G.json'))['cost']['training_paths'])"
pack
timeout $(left) python3 benchmarks/probes/compile_background_probe.py --models 24 --out $W/compile_background_$G.json \
  > $W/compile_background_$G.log 2>&1
echo "probe rc $? after $((SECONDS-T0)) s"; tail -12 $W/compile_background_$G.log | cut -c1-400; pack
