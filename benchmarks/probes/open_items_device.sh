#!/bin/bash
# usage: open_items_device.sh [SECONDS]   (default 560; carry [".whl"])
# One device call for what the 2026-12-07 session could not run: tests/gpu (with the attention, text-inversion and
# book-keeping-through-attention files), then the DP step timings of the per-example path (after the clip-norm
# change) and of the vit-mha / lstm models. Everything it writes lands in $OUT.
T=${1:-560}
T0=$SECONDS
python3 -m pip install -q --no-deps --no-index .whl/*.whl
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
G=$(nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200 && echo h200 || echo h100)
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/gpu.txt
timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/gpu -rs > $OUT/gpu_tests_$G.txt 2>&1
echo "tests/gpu rc $?" | tee -a $OUT/gpu_tests_$G.txt
tail -3 $OUT/gpu_tests_$G.txt
LEFT=$(( T - (SECONDS - T0) - 10 ))
timeout $LEFT python3 benchmarks/dp_throughput.py --device cuda --models resnet18,vit-mha,lstm --runs per-example,fast,graph \
    --synthetic --name open_items_$G > $OUT/dp_throughput.log 2>&1
echo "dp_throughput rc $?"
cp benchmarks/results/dp_throughput_open_items_$G.* $OUT/ 2>/dev/null
grep -E "^\| (mlaudit|opacus|torch)|^## " $OUT/dp_throughput.log
