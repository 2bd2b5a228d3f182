#!/usr/bin/env bash
# The prepared GPU check, for a session lent a GPU machine (its image has python3 with a
# CUDA torch, safetensors, click, tqdm, pyyaml, pytest, transformers, peft): the GPU tests,
# then --device cpu against --device cuda on 13B-shaped tensors. Results land in $OUT.
#   run(command="bash benchmarks/gpu-check.sh", timeout_s=540)
set -uo pipefail
export PYTHONPATH="$PWD/src:$PWD" PYTHONUNBUFFERED=1 LAZYMERGE_NO_PICTURE=1
OUT="${OUT:-/tmp/gpu-check}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_device.py 2>&1 | tee "$OUT/pytest.txt"
python3 -m benchmarks.device --layers 4 --cache /tmp/bench --json "$OUT/device.json" 2>&1 | tee "$OUT/device.txt"
