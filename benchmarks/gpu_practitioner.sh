#!/usr/bin/env bash
# The practitioner's path on one GPU at real width (issue 18), through the course's own commands:
# CLIP-L/336 + Qwen2.5-0.5B at their real depth and width with random weights (`clip-l-336-random`,
# `qwen2.5-0.5b-random`: the real tokenizer, configs and 576 tokens per image), bf16, on 2,000 LLaVA-mix-like
# records over real photos (benchmarks/data_path.py):
#   build -> run_zero2.sh stage 1 -> stage 2 (freeze_vision) with SDPA and FlashAttention-2, packing off and on
#   -> chat on a photo.
#
#   bash benchmarks/gpu_practitioner.sh [OUT_DIR]             # one GPU (not run yet: no GPU was lent since it
#                                                              # was written)
#   SMALL=1 bash benchmarks/gpu_practitioner.sh /tmp/dry      # the same steps on CPU with the small real-shaped
#                                                              # world: a dry run of the script (2 steps each)
#
# Writes OUT_DIR/log.txt (every command, then its output) and OUT_DIR/summary.md (one row per training run:
# steps, seconds, real tokens per second, final loss). A run that fails (no flash-attn) is logged and skipped.
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out=$(mkdir -p "${1:-benchmarks/out/gpu_practitioner}" && cd "${1:-benchmarks/out/gpu_practitioner}" && pwd)
py=${PYTHON:-python3}
export PYTHON=$py
cd "$HERE"
if [[ -n "${SMALL:-}" ]]; then
  vision=clip-l-336-shaped; llm=qwen2.5-0.5b-shaped; steps=2; batch=2; precision=()
else
  vision=clip-l-336-random; llm=qwen2.5-0.5b-random; steps=20; batch=8; precision=(--bf16 true)
fi
log="$out/log.txt"
: >"$log"
step() {  # step NAME CMD...: run, log, and say whether it worked
  echo "=== $1: ${*:2}" | tee -a "$log"
  "${@:2}" >>"$log" 2>&1 && echo "ok: $1" | tee -a "$log" || { echo "FAILED ($?): $1" | tee -a "$log"; return 1; }
}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU"
  $py -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  $py -c "import flash_attn; print('flash_attn', flash_attn.__version__)" 2>&1 | tail -1
} | tee -a "$log"

step data $py -m benchmarks.data_path --records 2000 --data_only --out "$out/data" || exit 1
data="$out/data/mix2000.json"; images="$out/data/images"
step build $py -m course_lib.build --vision "$vision" --llm "$llm" --out "$out/empty" || exit 1
common=(--image_folder "$images" --data_path "$data" --template chat --max_steps "$steps"
        --per_device_train_batch_size "$batch" --save_strategy no --report_to none --logging_steps 5
        --train_sampling_strategy group_by_length "${precision[@]}")
step stage1 bash run_zero2.sh --stage pretrain --model_name_or_path "$out/empty" --output_dir "$out/pretrain" \
  --learning_rate 1e-3 "${common[@]}" || exit 1
runs=()
for attn in sdpa flash_attention_2; do
  for packing in false true; do
    name="finetune-$attn-packing-$packing"
    step "$name" bash run_zero2.sh --stage finetune --train_type freeze_vision \
      --model_name_or_path "$out/pretrain" --output_dir "$out/$name" --learning_rate 2e-5 \
      --attn_implementation "$attn" --packing "$packing" "${common[@]}" && runs+=("$name")
  done
done
photo="$images/coco/train2017/000000000001.jpg"
for name in "${runs[@]:0:1}"; do
  step "chat-$name" $py -m course_lib.chat --model "$out/$name" --image "$photo" --prompt "What is in the image?" \
    --max_new_tokens 16
done
$py - "$out" "${runs[@]}" <<'EOF' | tee "$out/summary.md"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print("| run | steps | seconds | real tokens/s | final loss |\n|---|---|---|---|---|")
for name in ["pretrain", *sys.argv[2:]]:
    s = json.loads((out / name / "training_summary.json").read_text())
    print(f"| {name} | {s['steps']} | {s['seconds']:.1f} | {s['tokens'] / s['seconds']:.0f} | {s['final_loss']:.3f} |")
EOF
