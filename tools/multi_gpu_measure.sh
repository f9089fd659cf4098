#!/usr/bin/env bash
# Everything issue 17 measures on one multi-GPU host, in one command (run through the
# device tool on an nvidia-h200-x2 / -x4 / -x8 machine, from the repository root):
#   bash tools/multi_gpu_measure.sh "$OUT"
# Writes JSON lines under the given folder; each harness also runs on its own.
set -u
out="${1:?output folder}"
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
world=$(python3 -c 'import torch; print(torch.cuda.device_count())')
echo "GPUs: $world"
python3 -m moesim.calibrate.torch_collectives --out "$out/collectives_x$world.jsonl" || true
# expert-parallel layers of catalog shapes (experts top_k d_model d_ff), 16 to 16k tokens/rank
for shape in "8 2 4096 14336" "64 8 2048 1024" "64 6 2048 1408" "60 4 2048 1408"; do
  set -- $shape
  if (( $1 % world == 0 )); then
    python3 -m moesim.calibrate.torch_ep --out "$out/ep_layers_x$world.jsonl" --world "$world" \
      --experts "$1" --top-k "$2" --d-model "$3" --d-ff "$4" --max-tokens 16384 --check || true
  fi
done
python3 -m moesim.calibrate.torch_train_dist --out "$out/train_dist_x2.jsonl" --world 2 --budget-s 300 || true
python3 -m moesim.calibrate.torch_kv_transfer --out "$out/kv_transfer.jsonl" || true
ls -l "$out"
