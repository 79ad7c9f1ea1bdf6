#!/usr/bin/env bash
# The whole comparison on a CPU, on a tiny random-weight checkpoint, under the KV budget of a 24 GB GPU
# beside Llama-3-8B. Naive runs out of budget at 8 requests; paged runs 8, and 49, in the same budget.
# Needs: pip install -r requirements.txt -r tools/requirements.txt
set -u
cd "$(dirname "$0")/.."
ckpt=checkpoints/tiny
[ -f $ckpt/consolidated.00.pth ] || python3 tools/make_checkpoint.py $ckpt || exit 1
for run in "naive 8" "naive 7" "paged 8" "paged 49"; do
    set -- $run
    echo; echo "\$ python llama3-$1.py $2 --ckpt-dir $ckpt --ref-lengths --quiet"
    python3 llama3-$1.py $2 --ckpt-dir $ckpt --ref-lengths --quiet
done
