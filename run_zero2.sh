#!/usr/bin/env bash
# run_zero2.sh: train a LLaVA with DeepSpeed ZeRO-2. The same script runs on a laptop's CPU and on the
# GPUs of one node.
#
#   bash run_zero2.sh                 no arguments: the tiny world end to end
#                                     (empty LLaVA -> stage 1 pretrain -> stage 2 LoRA finetune)
#   bash run_zero2.sh --stage pretrain --model_name_or_path runs/empty_llava \
#        --data_path LLaVA-CC3M-Pretrain-595K/ --output_dir runs/pretrain --bf16 true
#   bash run_zero2.sh --stage finetune --train_type use_lora --model_name_or_path runs/pretrain \
#        --data_path llava_instruct_150k.json --image_folder coco/train2017 --output_dir runs/lora \
#        --remove_unused_columns false --bf16 true --dataloader_num_workers 4 \
#        --gradient_accumulation_steps 8 --save_strategy epoch --report_to tensorboard --learning_rate 2e-4
#
# Every Hugging Face TrainingArguments flag passes through to `python -m course_lib.train`.
# GPU selection: NUM_GPUS=4 or INCLUDE=localhost:0,1 (or --num_gpus N / --include SPEC).
# Without CUDA: DeepSpeed's CPU accelerator with NUM_PROCS ranks (default 2, the cores split between them).
# One rank with every core is not always faster on 2 cores: freeze_vision ran 1.55x faster per step on one
# machine and as fast on another, where LoRA ran 1.4x slower (benchmarks/RESULTS.md).
# --deepspeed PATH replaces the shipped configs/zero2.json (e.g. LLaVA's zero2.json with "auto" values).
# Several nodes: run this script once on every node with NNODES, NODE_RANK, MASTER_ADDR (node 0's address) and
# MASTER_PORT (default 29500) set, as torchrun and SLURM name them (run_zero2.sbatch does it under SLURM), or
# with --num_nodes/--node_rank/--master_addr/--master_port. Each node launches its own ranks (DeepSpeed's
# --no_ssh mode); --hostfile FILE instead hands DeepSpeed a hostfile to launch every node over ssh from node 0.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python}"
NUM_GPUS="${NUM_GPUS:-}"
INCLUDE="${INCLUDE:-}"
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-}"
MASTER_ADDR="${MASTER_ADDR:-}"
HOSTFILE="${HOSTFILE:-}"
fail() { echo "error: $*" >&2; exit 2; }

args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --num_gpus) NUM_GPUS="$2"; shift 2 ;;
    --num_gpus=*) NUM_GPUS="${1#*=}"; shift ;;
    --include) INCLUDE="$2"; shift 2 ;;
    --include=*) INCLUDE="${1#*=}"; shift ;;
    --num_nodes) NNODES="$2"; shift 2 ;;
    --node_rank) NODE_RANK="$2"; shift 2 ;;
    --master_addr) MASTER_ADDR="$2"; shift 2 ;;
    --master_port) MASTER_PORT="$2"; shift 2 ;;
    --hostfile) HOSTFILE="$2"; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done

[[ "$NNODES" =~ ^[1-9][0-9]*$ ]] || fail "NNODES (--num_nodes) is '$NNODES'; expected a number of nodes, 1 or more"
if [[ -n "$HOSTFILE" && ! -f "$HOSTFILE" ]]; then fail "--hostfile $HOSTFILE: no such file"; fi
if (( NNODES > 1 )); then
  [[ -n "$MASTER_ADDR" ]] || fail "NNODES=$NNODES needs MASTER_ADDR (--master_addr): the address of node 0, which every node can reach"
  [[ "$NODE_RANK" =~ ^[0-9]+$ ]] || fail "NNODES=$NNODES needs NODE_RANK (--node_rank) on each node: 0 on node 0, up to $(( NNODES - 1 ))"
  (( NODE_RANK < NNODES )) || fail "NODE_RANK=$NODE_RANK is out of range for NNODES=$NNODES (expected 0 to $(( NNODES - 1 )))"
  MASTER_PORT="${MASTER_PORT:-29500}"  # every node must agree on it: no random default
elif [[ -n "$NODE_RANK" && "$NODE_RANK" != 0 && -z "$HOSTFILE" ]]; then
  fail "NODE_RANK=$NODE_RANK is out of range for NNODES=1; set NNODES (--num_nodes) to the number of nodes"
fi

launcher=()
if "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  if [[ -n "$INCLUDE" ]]; then launcher+=(--include "$INCLUDE");
  elif [[ -n "$NUM_GPUS" ]]; then launcher+=(--num_gpus "$NUM_GPUS"); fi
else
  export DS_ACCELERATOR=cpu
  NUM_PROCS="${NUM_PROCS:-2}"
  launcher+=(--num_gpus "$NUM_PROCS")
  cores=$(nproc)
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( cores / NUM_PROCS > 0 ? cores / NUM_PROCS : 1 ))}"
fi
MASTER_PORT="${MASTER_PORT:-$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
made_hostfile=""
cleanup() {
  if [[ -n "$made_hostfile" ]]; then rm -f "$made_hostfile"; fi
  # DeepSpeed's CPU all-reduce maps a 67 MB shared-memory buffer per rank, named after the user, master
  # address, port and rank, and never unlinks it (shm.cpp defines shared_close but never calls it): each run
  # used to leave NUM_PROCS x 67 MB of RAM in /dev/shm until the next reboot.
  if [[ "${DS_ACCELERATOR:-}" == cpu ]]; then rm -f /dev/shm/deepspeed_allreduce_buffer_"$(id -u)"_*_"$MASTER_PORT"_*; fi
}
trap cleanup EXIT
if (( NNODES > 1 )) && [[ -z "$HOSTFILE" ]]; then
  # DeepSpeed's --no_ssh mode: this node starts its own ranks; a hostfile of NNODES equal nodes tells it the world.
  per_node="${NUM_PROCS:-${NUM_GPUS:-$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')}}"
  made_hostfile="$(mktemp)"
  for (( n = 0; n < NNODES; n++ )); do echo "node$n slots=$per_node"; done >"$made_hostfile"
  launcher=(--hostfile "$made_hostfile" --no_ssh --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR")
elif [[ -n "$HOSTFILE" ]]; then
  launcher=(--hostfile "$HOSTFILE")
  if [[ -n "$NODE_RANK" ]]; then launcher+=(--no_ssh --node_rank "$NODE_RANK"); fi
  if [[ -n "$MASTER_ADDR" ]]; then launcher+=(--master_addr "$MASTER_ADDR"); fi
fi

train() {  # train FLAGS...: validate in one process (one-line errors), then launch DeepSpeed
  local flags=("$@")
  COURSE_LAUNCHED_AT="$(date +%s.%N)"; export COURSE_LAUNCHED_AT  # train logs how long start-up took
  if [[ " ${flags[*]} " != *" --deepspeed "* && " ${flags[*]} " != *" --deepspeed="* ]]; then
    flags+=(--deepspeed "$HERE/configs/zero2.json")
  fi
  local one_node=1  # the check removes leftover op-build locks only when no other node may share them
  if (( NNODES > 1 )) || [[ -n "$HOSTFILE" ]]; then one_node=0; fi
  COURSE_ONE_NODE="$one_node" "$PYTHON" -m course_lib.train --check_only true "${flags[@]}" || exit 2
  echo "[run_zero2] deepspeed ${launcher[*]} course_lib.train ${flags[*]}"
  "$PYTHON" -m deepspeed.launcher.runner "${launcher[@]}" --master_port "$MASTER_PORT" \
    --module --no_local_rank course_lib.train "${flags[@]}"
}

if [[ ${#args[@]} -gt 0 ]]; then
  train "${args[@]}"
  exit 0
fi

# --- No arguments: the tiny world, end to end -------------------------------------------------------
eval "$("$PYTHON" -m course_lib.tiny_world)"
OUT="${OUT:-runs/tiny}"
if [[ ! -f "$OUT/empty_llava/config.json" ]]; then
  "$PYTHON" -m course_lib.build --vision tiny --llm tiny --out "$OUT/empty_llava"
fi
# The flags of each stage come from the course's one recipe book (course_lib/training/recipes.py).
# On CPU the recipe's batch of 32 is split over the NUM_PROCS ranks (on GPUs each gets 32).
recipe() { "$PYTHON" -m course_lib.training.recipes "$@" --data "$TINY_DATA" --ranks "${NUM_PROCS:-1}"; }
# Stage 1, LLaVA-1.5's pretrain recipe scaled down: projector only, lr 1e-3, one epoch.
mapfile -t flags < <(recipe pretrain --model "$OUT/empty_llava" --output_dir "$OUT/pretrain")
train "${flags[@]}"
# Stage 2 with LoRA on the language model; the projector trains in full at its own LR.
mapfile -t flags < <(recipe finetune use_lora --model "$OUT/pretrain" --output_dir "$OUT/finetune_use_lora")
train "${flags[@]}"

# An image question from the held-out set, for the chat example below.
IFS=$'\t' read -r EXAMPLE_IMAGE EXAMPLE_QUESTION < <("$PYTHON" -c 'import json, sys
r = next(r for r in json.load(open(sys.argv[1])) if r.get("type") == "color")
print(r["image"], r["conversations"][0]["value"].replace("<image>\n", ""), sep="\t")' "$TINY_DATA/eval/eval.json")

cat <<EOF

Done. Outputs:
  empty LLaVA          $OUT/empty_llava
  stage 1 (pretrain)   $OUT/pretrain            (loss curve: $OUT/pretrain/loss_curve.png)
  stage 2 (LoRA)       $OUT/finetune_use_lora   (loss curve: $OUT/finetune_use_lora/loss_curve.png)
Chat with it:
  python -m course_lib.chat --model $OUT/finetune_use_lora \\
      --image $TINY_DATA/eval/images/$EXAMPLE_IMAGE --prompt "$EXAMPLE_QUESTION"
Score it:
  python -m course_lib.eval --model $OUT/finetune_use_lora --data $TINY_DATA/eval/eval.json \\
      --images $TINY_DATA/eval/images
EOF
