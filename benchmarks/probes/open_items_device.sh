#!/bin/bash
# usage: open_items_device.sh [SECONDS]   (default 560; carry [".whl", ".data_xz"])
# One device call: tests/gpu (with the attention, text-inversion, book-keeping-through-attention and TF32 conv-norm
# tests, none run on a GPU yet), then the DP step timings: ResNet-18-GN and the fast CNN with the conv-norm matmuls
# opt-in TF32 (`tf32norms`) against the default and graphed, Opacus beside; then
# the per-example path (after the clip-norm change) and the vit-mha / lstm models. Everything lands in $OUT.
T=${1:-560}
T0=$SECONDS
python3 -m pip install -q --no-deps --no-index .whl/*.whl
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
mkdir -p .data
python3 -c "import lzma,shutil; shutil.copyfileobj(lzma.open('.data_xz/cifar10-jpeg.npz.xz'), open('.data/cifar10-jpeg.npz','wb'))"
G=$(nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200 && echo h200 || echo h100)
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/gpu.txt
timeout 170 python3 -m pytest -q -p no:cacheprovider -m gpu tests/gpu -rs > $OUT/gpu_tests_$G.txt 2>&1
echo "tests/gpu rc $? after $((SECONDS-T0)) s" | tee -a $OUT/gpu_tests_$G.txt
tail -3 $OUT/gpu_tests_$G.txt
LEFT=$(( T - (SECONDS - T0) - 10 ))
timeout $LEFT python3 benchmarks/dp_throughput.py --device cuda --models resnet18,fastcnn --conv-materialise unfold \
    --runs fast,tf32norms,graph --name tf32norms_$G > $OUT/dp_throughput_tf32norms.log 2>&1
echo "dp_throughput tf32norms rc $? after $((SECONDS-T0)) s"
cp benchmarks/results/dp_throughput_tf32norms_$G.* $OUT/ 2>/dev/null
grep -E "ms/step|^\| mlaudit_dpsgd" $OUT/dp_throughput_tf32norms.log | head -30
LEFT=$(( T - (SECONDS - T0) - 10 ))
if [ $LEFT -gt 60 ]; then
  timeout $LEFT python3 benchmarks/dp_throughput.py --device cuda --models vit-mha,lstm --runs per-example,fast,graph \
      --synthetic --name open_items_$G > $OUT/dp_throughput_open_items.log 2>&1
  echo "dp_throughput open_items rc $? after $((SECONDS-T0)) s"
  cp benchmarks/results/dp_throughput_open_items_$G.* $OUT/ 2>/dev/null
  grep -E "ms/step" $OUT/dp_throughput_open_items.log | head -30
fi
