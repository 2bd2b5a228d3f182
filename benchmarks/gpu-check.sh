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
# The copy lane (LAZYMERGE_COPY_LANE), slower on 2 cores: in order vs lane on this
# machine's cores, whole command, cold (root drops the cache) or warm otherwise.
python3 -m benchmarks.generate /tmp/bench/lane --layers 2 >/dev/null 2>&1 &&
  python3 -c "from benchmarks.runner import write_recipe; from pathlib import Path; write_recipe(Path('/tmp/bench/lane'), 2)" &&
  python3 -m benchmarks.firstbyte /tmp/bench/lane/recipe.yaml --repeat 3 --modes cold,inputs --lane 0,1 2>&1 | tee "$OUT/lane.txt"
