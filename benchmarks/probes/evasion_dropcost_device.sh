#!/bin/bash
# usage: evasion_dropcost_device.sh [SECONDS]   (default 570; carry [".whl", ".data_xz"])
# One device call (2026-12-07): the issue-16 evasion benchmark after the early-stop drop rule changed
# from "half the batch" to "the done samples' remaining passes >= 2 passes of the batch" (craft/engine.py
# _shrink_passes), torchattacks 3.5.1 side by side; then the FGSM timeline probe if time is left.
T=${1:-570}
T0=$SECONDS
python3 -m pip install -q --no-deps --no-index .whl/*.whl
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
mkdir -p .data
python3 -c "import lzma,shutil; shutil.copyfileobj(lzma.open('.data_xz/cifar10-jpeg.npz.xz'), open('.data/cifar10-jpeg.npz','wb'))"
G=$(nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200 && echo h200 || echo h100)
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/gpu.txt
LEFT=$(( T - (SECONDS - T0) - 15 ))
timeout $LEFT python3 benchmarks/evasion.py --dataset cifar10 --device cuda --models resnet18 --examples 1000 \
  --eps 8/255 --eps-l2 0.5 --steps 50 \
  --recipe '{"name":"airbench","epochs":10,"label_smoothing":0.0,"augment":{"crop_pad":4,"flip":true}}' \
  --adversarial 8/255 --adv-steps 7 --attacks "FGSM linf;PGD-20 linf;PGD-10 l2;APGD-CE-50 linf" --repeats 15 \
  --name cifar10_resnet18_at10_dropcost_$G > $OUT/evasion.log 2>&1
echo "evasion rc $? after $((SECONDS-T0)) s"
cp benchmarks/results/evasion_cifar10_resnet18_at10_dropcost_$G.* $OUT/ 2>/dev/null
LEFT=$(( T - (SECONDS - T0) - 10 ))
if [ $LEFT -gt 40 ]; then
  timeout $LEFT python3 benchmarks/probes/fgsm_timeline.py --examples 1000 --reps 21 > $OUT/fgsm_timeline_$G.txt 2>&1
  echo "timeline rc $? after $((SECONDS-T0)) s"; tail -6 $OUT/fgsm_timeline_$G.txt
fi
grep -E "^\|" $OUT/evasion.log | tail -12
