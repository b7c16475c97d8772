#!/usr/bin/env bash
# The device checks for a lent GPU machine, as one short run (about 5 minutes on an H200):
#
#   scripts/check_gpu.sh [OUT_DIR]     # expects torch with CUDA and the project's dependencies installed
#
# 1. the codec where a GPU node runs it (bench_comm.py --codec-device cuda, a Llama-3-8B-sized adapter of
#    41.9 M values): the grid stages on the GPU, the wire's bytes on the host, the same bits as the CPU;
# 2. per-step swarms whose nodes train on the GPU (`[node] device = "auto"` picks CUDA): the node quantizes
#    its gradient there and hands its parts to the averager process (ShardAverager.put_parts); every round's
#    adapters must hash the same on every node, as on a CPU;
# 3. the shards benchmark's GPU preset (seconds per sample and peak memory, 0.5B and 8B shapes).
set -euo pipefail
out=${1:-${OUT:-.}}
mkdir -p "$out"
cd "$(dirname "$0")/.."
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
pip install -q --no-deps -e . >/dev/null
python scripts/bench_comm.py --skip modes utilisation scale --codec-device cuda --codec-values 41943040 \
    --out "$out/codec_gpu.json"
python -m pytest -q -p no:cacheprovider -p no:rerunfailures tests/test_swarm.py tests/test_lost_part.py \
    --basetemp "$out/pytest" 2>&1 | tail -n 5 | tee "$out/swarm_tests.txt"
python scripts/bench_shards.py --preset gpu --out "$out/bench_shards_gpu.json"
