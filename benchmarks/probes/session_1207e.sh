#!/bin/bash
# usage: session_1207e.sh [SECONDS]   (default 560; carry [".whl", ".data_xz"])
# First device call of 2026-12-07 (fifth session), each part cut to the time left:
# 1. issue 23: does the CUDA graph of a compiled step (recipe.compile + cuda_graph, new this session) beat the graph of
#    the eager step? airbench net K=4 loop and ResNet-18 K=8 loop (witches-brew, 2 epochs), the plain loop beside;
# 2. the GPU tests of the graphed steps (the compiled one is new);
# 3. issue 15: the graphed DP step with the default IEEE conv norms next to TF32 norms, Opacus beside.
T=${1:-560}
MARGIN=8
. benchmarks/probes/device_setup.sh
unpack_cifar
nvidia-smi --query-gpu=name --format=csv,noheader | tee $W/gpu.txt
timeout $(left 150) python3 benchmarks/factory.py --part graph --compile \
  --only "airbench net, airbench-muon, K=4 loop|resnet18, witches-brew 2 epochs, K=8 loop" --name compile_graph_$G \
  > $W/compile_graph.log 2>&1
echo "compile probe rc $? after $((SECONDS-T0)) s"; cp benchmarks/results/factory_graph_compile_graph_$G.* $W/ 2>/dev/null
grep -vE "^\s*$" $W/compile_graph.log | grep -E "True|plain|rror" | cut -c1-400 | head -20; pack
timeout $(left 100) python3 -m pytest -q -p no:cacheprovider -m gpu tests/gpu/test_cuda_factory.py -k "graph" -rs \
  > $W/gpu_tests_$G.txt 2>&1
echo "tests rc $? after $((SECONDS-T0)) s" | tee -a $W/gpu_tests_$G.txt; tail -5 $W/gpu_tests_$G.txt; pack
timeout $(left) python3 benchmarks/dp_throughput.py --device cuda --models resnet18,fastcnn --runs fast,graph,tf32norms \
  --name graph_ieee_$G > $W/dp_graph.log 2>&1
echo "dp rc $? after $((SECONDS-T0)) s"; cp benchmarks/results/dp_throughput_graph_ieee_$G.* $W/ 2>/dev/null
grep -E "ms/step|rror" $W/dp_graph.log | head -30; pack
