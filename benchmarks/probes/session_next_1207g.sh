#!/bin/bash
# usage: session_next_1207g.sh [SECONDS]   (default 560; carry [".whl", ".data_xz"])
# Prepared 2026-12-07 (seventh session; no device time was left to run it) for the next device call, issue 23
# goals 2 and 5. Since that session recipe.compile auto compiles in a background thread (factory.layout.CompileProbe)
# while the first chunks train with the eager graphed step, CUDA graphs are captured with
# capture_error_mode="thread_local", and the membership kind runs its four ROC analyses in threads.
# 1. the two GPU tests of the background compile: its graphs must serve the captured compiled probe without a
#    recompile (error_on_recompile), and 12 chunks must capture their graphs while it runs;
# 2. the 256-model lean pool with compile: auto: cost.training_paths should show the chunks trained eagerly while
#    compiling and the compiled rest; compare with 251.9 s training / 275.4 s whole with the compile inside the probe
#    (H100, 2026-12-07, membership_cifar10_membership_256_airbench_lean_auto_checked_h100.md) and roc_bootstrap with
#    8.9 s there;
# 3. in the time left, the per-chunk record of a 24-model pool (compile_background_probe.py): the eager chunks' time
#    per model while the compile runs (the GIL: COMPILE_SWITCH_INTERVAL_S) against ~1.0 s eager alone.
# On an H200 if one comes: the goal's GPU.
T=${1:-560}
MARGIN=8
. benchmarks/probes/device_setup.sh
unpack_cifar &
timeout 100 python3 -m pytest -q -s -p no:cacheprovider -m gpu tests/gpu/test_cuda_factory.py \
  -k "compile_auto or while_the_step_compiles" -rs > $W/gpu_tests_compile_bg_$G.txt 2>&1
echo "tests rc $? after $((SECONDS-T0)) s"
grep -E " passed| failed|compile auto|Error|assert" $W/gpu_tests_compile_bg_$G.txt | cut -c1-400 | tail -12; pack
wait
timeout $(left 60) python3 benchmarks/membership.py benchmarks/configs/cifar10_membership_256_airbench_lean_auto.yaml \
  --device cuda --name cifar10_membership_256_airbench_lean_auto_bg_$G > $W/pool_auto_bg.log 2>&1
echo "pool rc $? after $((SECONDS-T0)) s"
cp benchmarks/results/membership_cifar10_membership_256_airbench_lean_auto_bg_$G.* $W/ 2>/dev/null
grep -E "lira|Pool:|After" $W/pool_auto_bg.log | cut -c1-300
python3 -c "import json; print(json.load(open('$W/membership_cifar10_membership_256_airbench_lean_auto_bg_$G.json'))['cost']['training_paths'])"
pack
timeout $(left) python3 benchmarks/probes/compile_background_probe.py --models 24 --out $W/compile_background_$G.json \
  > $W/compile_background_$G.log 2>&1
echo "probe rc $? after $((SECONDS-T0)) s"; tail -12 $W/compile_background_$G.log | cut -c1-400; pack
