# Sourced by the device-call scripts here (bash): `T=<seconds>; MARGIN=<s>; . benchmarks/probes/device_setup.sh`.
# Installs the carried wheels (.whl), puts src on PYTHONPATH, sets G (h100 / h200) and gives
#   left [MARGIN]   seconds left of T, less MARGIN;
#   pack            $W (/tmp/w) packed into $OUT/all.tgz (at most 8 files come back from a call: write to $W, pack
#                   after each part);
#   unpack_cifar    the carried .data_xz/cifar10-jpeg.npz.xz into .data/;
#   run_pool CONFIG NAME SECONDS   benchmarks/membership.py on benchmarks/configs/CONFIG.yaml (CUDA) as NAME: its
#                   log, results and cost.training_paths into $W, then pack;
#   gpu_tests NAME SECONDS EXPR    the GPU tests of tests/gpu/test_cuda_factory.py selected by -k EXPR, at most SECONDS
#                   (and what is left), their log as $W/gpu_tests_NAME_$G.txt, then pack;
#   dp_model MODEL RESERVE RUNS    benchmarks/dp_throughput.py --models MODEL --runs RUNS (convs unfolded, then
#                   shifted), leaving RESERVE seconds; its log and results into $W, then pack.
T0=$SECONDS
left() { echo $(( T - (SECONDS - T0) - ${1:-${MARGIN:-10}} )); }
W=/tmp/w; mkdir -p $W
pack() { tar czf $OUT/all.tgz -C $W . ; }
unpack_cifar() {
  mkdir -p .data
  python3 -c "import lzma,shutil; shutil.copyfileobj(lzma.open('.data_xz/cifar10-jpeg.npz.xz'), open('.data/cifar10-jpeg.npz','wb'))"
}
run_pool() {
  timeout $3 python3 benchmarks/membership.py benchmarks/configs/$1.yaml --device cuda --name $2 > $W/pool_$2.log 2>&1
  echo "pool rc $? after $((SECONDS-T0)) s"
  cp benchmarks/results/membership_$2.* $W/ 2>/dev/null
  grep -E "lira|Pool:|After|Warning" $W/pool_$2.log | cut -c1-300
  python3 -c "import json, sys; print(json.load(open(sys.argv[1]))['cost']['training_paths'])" $W/membership_$2.json
  pack
}
gpu_tests() {
  local s=$(left); [ $s -gt $2 ] && s=$2
  timeout $s python3 -m pytest -q -s -p no:cacheprovider -m gpu tests/gpu/test_cuda_factory.py -k "$3" -rs \
    > $W/gpu_tests_$1_$G.txt 2>&1
  echo "tests rc $? after $((SECONDS-T0)) s"
  grep -E " passed| failed|compile auto|paused|Error|assert" $W/gpu_tests_$1_$G.txt | grep -v "^\(stem\|blocks\|head\)\." \
    | cut -c1-400 | tail -14
  pack
}
dp_model() {  # dp_model MODEL RESERVE RUNS: benchmarks/dp_throughput.py for one model, leaving RESERVE seconds
  [ $(left $2) -lt 60 ] && { echo "stopped before $1: $(left) s left"; return; }
  timeout $(left $2) python3 benchmarks/dp_throughput.py --device cuda --models $1 --conv-materialise unfold,shift \
    --runs $3 --steps 20 --name compile_all_${1}_$G > $W/dp_all_$1.log 2>&1
  echo "dp_throughput $1 rc $? after $((SECONDS-T0)) s"
  grep -E "ms/step|Error" $W/dp_all_$1.log | grep -v "^W1" | cut -c1-300
  cp benchmarks/results/dp_throughput_compile_all_${1}_$G.* $W/ 2>/dev/null; pack
}
python3 -m pip install -q --no-deps --no-index .whl/*.whl
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
G=$(nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200 && echo h200 || echo h100)
