#!/bin/bash
# usage: session_1207g.sh [SECONDS]   (default 560; carry [".whl", ".data_xz"])
# 2026-12-07 (seventh session), issue 23 goals 2 and 5: recipe.compile auto now compiles in a background thread
# (factory.layout.CompileProbe) while the first chunks train with the eager graphed step.
# 1. the GPU tests of compile auto (the background compile must serve the captured step without recompiling) and of
#    captures on the job's thread while the compile runs (capture_error_mode thread_local);
# 2. (also: the four attacks' ROC analyses now run in threads, membership_report.all_attack_metrics)
# 3. the 256-model lean pool with compile: auto: cost.training_paths should show the chunks trained eagerly while
#    compiling and the compiled rest; the training time against 251.9 s with the compile in the probe (H100, 2026-12-07).
T=${1:-560}  # the pool first (the measurement), then the tests in the time left
MARGIN=8
. benchmarks/probes/device_setup.sh
unpack_cifar
timeout $(left) python3 benchmarks/membership.py benchmarks/configs/cifar10_membership_256_airbench_lean_auto.yaml \
  --device cuda --name cifar10_membership_256_airbench_lean_auto_bg_$G > $W/pool_auto_bg.log 2>&1
echo "pool rc $? after $((SECONDS-T0)) s"; cp benchmarks/results/membership_cifar10_membership_256_airbench_lean_auto_bg_$G.* $W/ 2>/dev/null
grep -E "lira|Pool:|After|chunk of" $W/pool_auto_bg.log | head -20 | cut -c1-300
python3 -c "import json; print(json.load(open('$W/membership_cifar10_membership_256_airbench_lean_auto_bg_$G.json'))['cost']['training_paths'])"; pack
timeout $(left) python3 -m pytest -q -s -p no:cacheprovider -m gpu tests/gpu/test_cuda_factory.py -k "compile_auto or while_the_step_compiles" -rs \
  > $W/gpu_tests_compile_bg_$G.txt 2>&1
echo "tests rc $? after $((SECONDS-T0)) s"; grep -E " passed| failed|compile auto|Error|assert" $W/gpu_tests_compile_bg_$G.txt | cut -c1-400 | tail -12; pack
