#!/bin/bash
# usage: session_1208c.sh [SECONDS]   (default 560; carry [".whl", ".data_xz"])
# Prepared 2026-12-08 for a device call, issue 23: compile: auto's compile in the background (captures paused while it
# runs) against the compile on the job's thread, on one machine. On an H100 (2026-12-08) the chunks trained beside the
# background compile took 3.88 s per model against 0.95-1.06 s compiled, and the 256-model pool was no faster than the
# foreground compile of another machine (257.2 against 251.9 s of training). Here: 24 models of the lean pool with
# compile: auto, background / foreground / foreground / background, each in a fresh process with fresh inductor and
# Triton caches (neither reuses the other's kernels); compare train_wall_s and the per-chunk records.
T=${1:-560}
MARGIN=8
. benchmarks/probes/device_setup.sh
unpack_cifar
for side in background foreground foreground background; do
  [ $(left) -lt 60 ] && { echo "stopped before $side: $(left) s left"; break; }
  c=$(mktemp -d); i=$((${i:-0} + 1))
  TORCHINDUCTOR_CACHE_DIR=$c/inductor TRITON_CACHE_DIR=$c/triton timeout $(left) \
    python3 benchmarks/probes/compile_background_probe.py --models 24 $([ $side = foreground ] && echo --foreground) \
    --out $W/compile_ab_${i}_${side}_$G.json > $W/compile_ab_${i}_${side}_$G.log 2>&1
  echo "$i $side rc $? after $((SECONDS-T0)) s: $(python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(d['train_wall_s'], [c['s_per_model'] for c in d['chunks']])" $W/compile_ab_${i}_${side}_$G.json 2>&1 | tail -1)"
  rm -rf $c; pack
done
# Issue 23 goal 4 (80 ResNet-18 x 40 epochs; one process with 8 graphed models on 8 streams: 0.96-0.98 s per
# model-epoch, 4.2-4.4x the plain loop, 8x asked): do two processes of 8 graphed models each fill the GPU further?
# 16 ResNet-18 x 2 epochs (witches-brew), one process (K = 8) against two process workers (K = 8 each), same trials.
if [ $(left) -gt 150 ]; then
  timeout $(left) python3 benchmarks/factory.py --part procs --model resnet18 --recipe witches-brew --epochs 2 \
    --models 16 --settings local:8,process:2:8 --name resnet18_graphs_procs_$G > $W/factory_procs_resnet.log 2>&1
  echo "factory procs rc $? after $((SECONDS-T0)) s"; grep -E "^(local|process)" $W/factory_procs_resnet.log | cut -c1-300
  cp benchmarks/results/factory_procs_resnet18_graphs_procs_$G.* $W/ 2>/dev/null; pack
fi
