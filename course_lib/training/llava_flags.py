"""haotian-liu/LLaVA's `train.py` flags, translated, so LLaVA-1.5's own launch scripts run through `run_zero2.sh`.

`scripts/v1_5/pretrain.sh`, `finetune.sh` and `finetune_lora.sh` pass LLaVA's flags. Each flag is handled
in one of three ways:
* it keeps its meaning under this course's name (`--lora_enable True` is `--train_type use_lora`,
  `--mm_projector_lr` is `--projector_lr`, `--image_aspect_ratio pad` is `--pad_to_square true`, ...);
* it states what this course always does, so it is dropped with a note (`--lazy_preprocess True`,
  `--mm_projector_type mlp2x_gelu`, `--mm_vision_select_layer -2`, `--mm_use_im_start_end False`, ...);
* it asks for something this course does not do, so it is refused in one line that names the course's way
  (`--vision_tower` with an LLM as `--model_name_or_path`, `--bits 4`, a pickled `mm_projector.bin`).

Hugging Face's own flags in those scripts (`--bf16`, `--tf32`, `--gradient_checkpointing`,
`--model_max_length`, `--group_by_modality_length`, ...) need no translation, except the two that
transformers 5 renamed: `--evaluation_strategy` and `--warmup_ratio`.
"""

from __future__ import annotations

from course_lib.serving.loading import is_llava_folder
from course_lib.training.trainable import TrainSetupError

TRUE, FALSE = ("true", "1", "yes"), ("false", "0", "no")
# LLaVA's name (or an older transformers' name that LLaVA's scripts pass) -> the name here, same meaning.
# transformers 5 folded `warmup_ratio` into `warmup_steps`: a value below 1 is a ratio of the total steps.
RENAMED = {"mm_projector_lr": "projector_lr", "evaluation_strategy": "eval_strategy", "warmup_ratio": "warmup_steps"}
# Values that are what this course always does: the flag is dropped (with a note).
ALWAYS = {"lazy_preprocess": TRUE, "mm_projector_type": ("mlp2x_gelu",), "mm_vision_select_layer": ("-2",),
          "mm_vision_select_feature": ("patch",), "mm_use_im_start_end": FALSE, "mm_use_im_patch_token": FALSE,
          "bits": ("16",), "freeze_backbone": FALSE, "freeze_mm_mlp_adapter": FALSE, "lora_bias": ("none",),
          "tune_mm_mlp_adapter": FALSE, "lora_enable": FALSE}
# Flags only LLaVA's train.py has: their presence means a LLaVA command line.
LLAVA_ONLY = {"vision_tower", "version", "tune_mm_mlp_adapter", "pretrain_mm_mlp_adapter", "lora_enable",
              "mm_projector_type", "mm_vision_select_layer", "mm_use_im_start_end", "mm_use_im_patch_token",
              "mm_projector_lr", "image_aspect_ratio", "lazy_preprocess"}
WHY_NOT = {
    "lazy_preprocess": "this course always tokenizes lazily",
    "mm_projector_type": "the projector is built by `python -m course_lib.build` (mlp2x_gelu; notebook 09 "
                         "compares others)",
    "mm_vision_select_layer": "the feature layer is part of the built model (vision_feature_layer -2 in its "
                              "config.json)",
    "mm_vision_select_feature": "CLS is always dropped (vision_feature_select_strategy 'default')",
    "mm_use_im_start_end": "no image start/end tokens are used",
    "mm_use_im_patch_token": "no image patch tokens are used",
    "bits": "4- and 8-bit (QLoRA) training is not supported; train in 16 bits (--bf16 true)",
    "freeze_backbone": "what trains is chosen by --stage and --train_type",
    "freeze_mm_mlp_adapter": "the projector trains in every stage; what else trains is chosen by --train_type",
    "lora_bias": "LoRA trains no biases",
}


def _split(argv: list[str]) -> list[tuple[str, str | None, list[str]]]:
    """[(flag name, value or None, the original tokens)] for `--flag value`, `--flag=value`, bare `--flag`."""
    pairs, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--") and "=" in arg:
            name, value = arg[2:].split("=", 1)
            pairs.append((name, value, [arg]))
            i += 1
        elif arg.startswith("--") and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            pairs.append((arg[2:], argv[i + 1], argv[i:i + 2]))
            i += 2
        else:
            pairs.append((arg[2:] if arg.startswith("--") else "", None, [arg]))
            i += 1
    return pairs


def translate_llava_flags(argv: list[str]) -> tuple[list[str], list[str]]:
    """(argv in this course's flags, notes on what was translated or dropped); TrainSetupError for a flag
    that asks for something this course does not do."""
    pairs = _split(argv)
    given = {name: value for name, value, _ in pairs}
    out: list[str] = []
    notes: list[str] = []

    def add(name: str, value: str, why: str) -> None:
        if name in given and given[name] != value:
            raise TrainSetupError(f"{why} sets --{name} {value}, but --{name} {given[name]} is also given")
        out.extend([f"--{name}", value])
        notes.append(why)

    for name, value, tokens in pairs:
        low = (value or "true").lower()
        if name in RENAMED:
            out.extend([f"--{RENAMED[name]}", *tokens[1:]] if len(tokens) == 2 else
                       [tokens[0].replace(f"--{name}", f"--{RENAMED[name]}", 1)])
            notes.append(f"--{name} is --{RENAMED[name]} here")
        elif name in ALWAYS and low in ALWAYS[name]:
            if name in WHY_NOT:
                notes.append(f"--{name} {value} dropped: {WHY_NOT[name]}")
        elif name in ALWAYS and name in WHY_NOT:
            raise TrainSetupError(f"--{name} {value}: not supported here; {WHY_NOT[name]}")
        elif name == "lora_enable":
            add("train_type", "use_lora", "--lora_enable True")
        elif name == "tune_mm_mlp_adapter":
            add("stage", "pretrain", "--tune_mm_mlp_adapter True (train the projector only)")
        elif name == "image_aspect_ratio":
            if low == "pad":
                add("pad_to_square", "true", "--image_aspect_ratio pad")
            elif low == "anyres":
                raise TrainSetupError("--image_aspect_ratio anyres: use --image_tiling N, this course's dynamic "
                                      "resolution (up to N tiles + a thumbnail per image)")
            elif low not in ("square", "none"):
                raise TrainSetupError(f"--image_aspect_ratio {value}: expected pad, square or anyres")
        elif name == "version":
            add("template", "plain" if low == "plain" else "chat",
                f"--version {value}" + ("" if low == "plain" else " (the tokenizer's own chat template is used)"))
        elif name == "vision_tower":
            if not is_llava_folder(given.get("model_name_or_path")):
                raise TrainSetupError(
                    f"--vision_tower {value}: this course builds the LLaVA before training: python -m "
                    f"course_lib.build --vision {value} --llm {given.get('model_name_or_path') or 'LLM'} "
                    "--out runs/empty_llava, then pass --model_name_or_path runs/empty_llava")
            notes.append(f"--vision_tower {value} dropped: the vision tower is the one built into "
                         f"{given['model_name_or_path']}")
        elif name == "pretrain_mm_mlp_adapter":
            if not str(value).endswith(".safetensors"):
                raise TrainSetupError(f"--pretrain_mm_mlp_adapter {value}: LLaVA's mm_projector.bin is a pickle "
                                      "under LLaVA's own key names; pass this course's stage-1 output folder as "
                                      "--model_name_or_path, or its projector.safetensors as --pretrain_projector")
            out.extend(["--pretrain_projector", value])
            notes.append("--pretrain_mm_mlp_adapter is --pretrain_projector here")
        else:
            out.extend(tokens)
    if LLAVA_ONLY & given.keys() and "stage" not in given:
        # LLaVA has no stage flag: without --tune_mm_mlp_adapter True it finetunes. Its full finetune
        # (finetune.sh) keeps CLIP frozen, which is this course's freeze_vision.
        if "--stage" not in out:  # not set by --tune_mm_mlp_adapter True
            out.extend(["--stage", "finetune"])
            notes.append("no --tune_mm_mlp_adapter True: stage 2 (--stage finetune)")
            if "train_type" not in given and "--train_type" not in out:  # nor by --lora_enable True
                out.extend(["--train_type", "freeze_vision"])
                notes.append("no --lora_enable True: LLaVA-1.5's full finetune, which keeps CLIP frozen "
                             "(--train_type freeze_vision)")
    return out, notes
