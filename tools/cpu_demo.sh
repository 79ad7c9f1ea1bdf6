#!/usr/bin/env bash
# The whole comparison on a CPU, on a tiny random-weight checkpoint, under the KV budget of a 24 GB GPU
# beside Llama-3-8B. Naive runs out of budget at 8 requests; paged runs 8, and 49, in the same budget; then
# llama3-paged-samples.py runs 8 prompts with 4 samples each, the samples sharing their prompt's blocks.
# Needs what the README's quick start installs, a CPU build of torch first (a bare "torch" can pull a
# multi-GB CUDA build):
#   pip install torch==2.13.0 -r requirements.txt -r tools/requirements.txt
set -u
cd "$(dirname "$0")/.."
# One torch thread unless the caller says otherwise: the tiny model's tensors are small, and on a busy machine
# torch's default threads wait for each other (on 2 shared cores, two threads once took twice as long as one).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
ckpt=checkpoints/tiny
[ -f $ckpt/consolidated.00.pth ] || python3 tools/make_checkpoint.py $ckpt || exit 1
for run in "naive 8" "naive 7" "paged 8" "paged 49" "paged-samples 8 --samples 4 --temperature 0.8"; do
    set -- $run
    script=llama3-$1.py
    shift
    echo; echo "\$ python $script $* --ckpt-dir $ckpt --ref-lengths --quiet"
    python3 $script "$@" --ckpt-dir $ckpt --ref-lengths --quiet
done
