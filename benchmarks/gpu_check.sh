#!/usr/bin/env bash
# Short smoke of every GPU launch path, then throughput, on a machine with NVIDIA GPUs:
#
#   make install && bash benchmarks/gpu_check.sh [OUT_DIR]     (default work_dirs/gpu_check)
#
# 1. bf16 on one GPU (launch/single_gpu.yaml), 2. fp16 with its grad scaler, 3. DDP over all
# GPUs (launch/multi_gpu.yaml; needs 2 or more), 4. FSDP over all GPUs (launch/fsdp.yaml; on
# one GPU a single shard, which still runs the FSDP2 wrapping and full state dict path), then
# a single-process evaluation of FSDP's exported weights, 5. benchmarks/gpu_speed.py: ours
# against torchvision's, training and inference images/s at COCO size in bf16, as JSON lines
# in OUT_DIR/gpu_speed.jsonl, 6. benchmarks/throughput.py on the R50-FPN COCO recipe in
# bf16, bf16 compiled, and fp32. Each training run is 30 iterations
# of the demo recipe with a val phase; its log and metrics are in OUT_DIR/<name>/.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
OUT=${1:-work_dirs/gpu_check}
export WANDB_MODE=${WANDB_MODE:-offline}

NGPU=$("$BIN/python" -c "import torch; print(torch.cuda.device_count())")
if [ "$NGPU" -lt 1 ]; then
    echo "gpu_check: no CUDA GPU visible to torch" >&2
    exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
SMOKE=(max_iters=30 "workflow=[[train,1],[val,1]]" log_interval=10 data.workers_per_gpu=4)

train() {  # train NAME CONFIG NUM_PROCESSES [overrides...]
    local name=$1 config=$2 processes=$3
    shift 3
    echo "== $name: accelerate launch --config_file $config --num_processes $processes"
    "$BIN/accelerate" launch --config_file "$config" --num_processes "$processes" \
        trainer/run.py recipes/demo.yaml work_dir="$OUT/$name" "${SMOKE[@]}" "$@"
    tail -n 3 "$OUT/$name/log.txt"
}

train bf16 launch/single_gpu.yaml 1
train fp16 launch/single_gpu.yaml 1 mixed_precision=fp16
if [ "$NGPU" -ge 2 ]; then
    train ddp launch/multi_gpu.yaml "$NGPU"
else
    echo "== ddp: skipped (one GPU)"
fi
train fsdp launch/fsdp.yaml "$NGPU"
echo "== fsdp weights evaluated in one process"
"$BIN/python" -m trainer.evaluate recipes/demo.yaml --checkpoint "$OUT/fsdp" --out "$OUT/fsdp_eval"

echo "== ours vs torchvision, R50-FPN at COCO size, bf16 (one JSON line each)"
"$BIN/python" benchmarks/gpu_speed.py | tee "$OUT/gpu_speed.jsonl"
"$BIN/python" benchmarks/gpu_speed.py --compile | tee -a "$OUT/gpu_speed.jsonl"

for options in "--precision bf16" "--precision bf16 --compile" "--precision fp32"; do
    echo "== throughput $options"
    # shellcheck disable=SC2086
    "$BIN/python" benchmarks/throughput.py recipes/mask_rcnn.yaml $options
done
