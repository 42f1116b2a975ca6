#!/bin/bash
# usage: session_1208b.sh [SECONDS]   (default 560; carry [".whl", ".data_xz"])
# Prepared 2026-12-08 for the next device call, issue 15 goal 1 after the compiled DP rows were timed through the loop
# on an H100 (ResNet-18-GN 1.56x IEEE / 1.42x TF32, fast CNN 1.81x, ViT-small 1.19x; docs/privacy.md):
# 1. the fast CNN first (the model furthest from 1.5x): the graphed compiled DP step in IEEE, TF32 and bf16 autocast,
#    each with only the norms and sums compiled and with the recording forward and backward compiled too
#    (fastclip.COMPILE_RECORD, "-all"), the like-for-like references (mlaudit_sgd_tf32 for the TF32 rows,
#    mlaudit_sgd_recipe for bf16, the non-private step compiled and graphed) and Opacus beside; convs unfolded (the
#    CUDA default, with which no compiled row was timed yet) and, in fp32, by shifted windows (the 2026-12-08 rows);
#    one results file per model, so a timeout keeps what ran;
# 2. the GPU tests of the compiled DP step (both variants: is the compiled recording pass right on a GPU), the DP
#    compile probe and the background compile (at most 150 s);
# then session_1208d.sh: the per-layer rule check and ResNet-18-GN / ViT-small.
T=${1:-560}
MARGIN=8
. benchmarks/probes/device_setup.sh
unpack_cifar
RUNS=graph-compile,graph-compile-tf32,graph-compile-bf16,graph-compile-all,graph-compile-all-tf32,graph-compile-all-bf16
dp_model fastcnn 150 $RUNS
gpu_tests 1208b 150 "while_the_step_compiles or probes_a_dp_job or compiled_dp_step"
