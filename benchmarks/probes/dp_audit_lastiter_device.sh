#!/bin/bash
# usage: dp_audit_lastiter_device.sh SECONDS [MODELS_PER_SIDE]
# device call: the CIFAR-10 (JPEG) full-batch blank-canary audits (worst-case init, then random init if time is left)
. benchmarks/probes/device_setup.sh
unpack_cifar
mkdir -p /tmp/runs
nvidia-smi --query-gpu=name --format=csv,noheader
C=benchmarks/configs/dp_audit_cifar10_tanhcnn_blank_fullbatch_eps10.yaml
M=${2:-100}
(while true; do for v in worst random; do cp /tmp/runs/$v/*/artifacts/run.log $OUT/run_$v.log 2>/dev/null; done; sleep 10; done) & L=$!
T0=$SECONDS
timeout -s INT $1 python3 benchmarks/dp_audit.py $C --canaries blank --device cuda --models-per-side $M --name cifar10_tanhcnn_blank_fullbatch_worst_$G --run-dir /tmp/runs/worst > $OUT/worst.log 2>&1
echo "worst rc $? after $((SECONDS-T0)) s"
LEFT=$(( $1 - (SECONDS-T0) - 10 ))
if [ $LEFT -gt 120 ]; then
  timeout -s INT $LEFT python3 benchmarks/dp_audit.py $C --canaries blank --device cuda --models-per-side $M --set worst_case_init=null --name cifar10_tanhcnn_blank_fullbatch_random_$G --run-dir /tmp/runs/random > $OUT/random.log 2>&1
  echo "random rc $? after $((SECONDS-T0)) s"
fi
kill $L
for v in worst random; do cp /tmp/runs/$v/*/artifacts/run.log $OUT/run_$v.log 2>/dev/null; done
cp benchmarks/results/dp_audit_cifar10_tanhcnn_blank* $OUT/ 2>/dev/null
tail -3 $OUT/worst.log $OUT/random.log 2>/dev/null; tail -3 $OUT/run_*.log
