#!/bin/bash
# usage: session_next_1207i.sh [SECONDS]   (default 560; carry [".whl", ".data_xz"])
# Prepared 2026-12-07 (eighth session) for the next device call, issue 23 goals 2 and 5. On that session's H100 the
# background compile of compile: auto failed beside the chunks' CUDA graph captures (329.0 s of training); since
# then no capture runs while the compile thread works (graphed.pause_captures), and the ROC analyses run one after
# the other on a GPU again. Run after benchmarks/probes/session_1207j.sh, which runs the background compile's GPU
# tests (this script ran them too until the ninth session). Here:
# 1. the 256-model lean pool with compile: auto: compare 251.9 s training / 275.4 s whole (compile inside the probe,
#    H100, ..._lean_auto_checked_h100.md); cost.training_paths should show "captures paused" chunks, then compiled;
# 2. in the time left, the per-chunk record (compile_background_probe.py). On an H200 if one comes.
T=${1:-560}
MARGIN=8
. benchmarks/probes/device_setup.sh
unpack_cifar
run_pool cifar10_membership_256_airbench_lean_auto cifar10_membership_256_airbench_lean_auto_paused_$G $(left 40)
timeout $(left) python3 benchmarks/probes/compile_background_probe.py --models 24 --out $W/compile_background_$G.json \
  > $W/compile_background_$G.log 2>&1
echo "probe rc $? after $((SECONDS-T0)) s"; tail -12 $W/compile_background_$G.log | cut -c1-400; pack
