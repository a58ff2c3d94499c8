#!/usr/bin/env bash
# The prepared GPU check: real widths (CLIP-L/336 + Qwen2.5-0.5B / 1.5B geometry, random weights), bf16,
# one GPU, one process. Each line is one `python -m benchmarks.packing` run (full finetune: every parameter
# trains, AdamW), so every number below can be reproduced by the command printed above it.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        # about 5 minutes on one H100/H200
#
# Writes OUT_DIR/summary.md (every run's tables, as RESULTS.md sections), OUT_DIR/results.json and
# OUT_DIR/log.txt. A run that fails (no flash-attn wheel, out of memory) is logged and skipped.
set -uo pipefail
out=${1:-benchmarks/out/gpu}
mkdir -p "$out"
tmp=$(mktemp -d)
py=${PYTHON:-python3}
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    $py -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
    $py -c "import flash_attn; print('flash_attn', flash_attn.__version__)" 2>&1 | tail -1
} | tee "$out/log.txt"

runs=(
    "0.5b-sdpa       --geometry qwen2.5-0.5b --attn sdpa"
    "0.5b-sdpa-gc    --geometry qwen2.5-0.5b --attn sdpa --gradient_checkpointing true"
    "0.5b-sdpa-b16   --geometry qwen2.5-0.5b --attn sdpa --batch_size 16"
    "1.5b-sdpa       --geometry qwen2.5-1.5b --attn sdpa"
    "1.5b-sdpa-gc    --geometry qwen2.5-1.5b --attn sdpa --gradient_checkpointing true"
    "0.5b-fa2        --geometry qwen2.5-0.5b --attn flash_attention_2"
    "0.5b-flex       --geometry qwen2.5-0.5b --attn flex_attention --repeats 2"
)
for run in "${runs[@]}"; do
    read -r name flags <<<"$run"
    # shellcheck disable=SC2086
    cmd="python -m benchmarks.packing --device cuda --dtype bfloat16 --samples 96 --repeats 3 --skip loader growth $flags"
    echo "=== $name: $cmd" | tee -a "$out/log.txt"
    # shellcheck disable=SC2086
    timeout 150 $py -m benchmarks.packing --device cuda --dtype bfloat16 --samples 96 --repeats 3 \
        --skip loader growth $flags --out "$tmp/$name" >>"$out/log.txt" 2>&1 \
        || echo "FAILED ($?): $name" | tee -a "$out/log.txt"
    if [ -f "$tmp/$name/summary.md" ]; then
        tail -n 12 "$tmp/$name/summary.md"
        { echo "#### $name"; cat "$tmp/$name/summary.md"; echo; } >>"$out/summary.md"
    fi
done
$py - "$tmp" "$out/results.json" <<'EOF'
import json, sys
from pathlib import Path
runs = {p.parent.name: json.loads(p.read_text()) for p in sorted(Path(sys.argv[1]).glob("*/results.json"))}
Path(sys.argv[2]).write_text(json.dumps(runs, indent=1))
print(f"{len(runs)} runs in {sys.argv[2]}")
EOF
