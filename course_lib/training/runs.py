"""Runs keyed to what made them: a folder under runs/ is reused only if the same flags trained it from the same
starting model, on the same tiny world; otherwise it is trained again, and the old one is kept beside it.

A notebook that finds `runs/tiny/finetune_use_lora` cannot tell by its name whether it came from this world, from
an exercise's `--lora_r 4`, or from a stage-1 model that has since been retrained. So every training run records
its recipe in `training_summary.json` (`course_lib.train` writes `recipe_of(argv)`), and an empty LLaVA records
its backbones in `built_from.json` (`course_lib.build.built_from`):

* the flags, as a dict (the data paths carry the tiny world's key: another world, other paths);
* a fingerprint of the starting folder: its path, its `config.json` and the size and time of its weight files, so a
  stage-1 model trained again since makes every stage-2 run on it stale.

An interrupted run (a `recipe.json` of the same recipe, a complete checkpoint, no summary yet) is resumed.

    from course_lib.training.runs import train_once
    train_once(*tiny_flags("finetune", "use_lora", ...))   # trains, resumes, or says why the folder is reused
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from course_lib.training.checkpoints import SUMMARY, latest_complete_checkpoint
from course_lib.util.files import fingerprint

RECIPE = "recipe.json"  # written when a run starts; the summary, written last, repeats it
NOT_FINISHED = "no finished run there"
# Flags that do not change what is learnt: where the run goes, ZeRO's config (the same math), resuming.
NOT_RECIPE = {"--output_dir", "--deepspeed", "--resume_from_checkpoint", "--check_only", "--logging_steps",
              "--report_to", "--save_strategy", "--save_steps", "--save_total_limit"}


def flag_values(flags: list[str] | tuple[str, ...]) -> dict[str, str]:
    """`--name value` and `--name=value` pairs as a dict, without the flags that do not change the recipe."""
    values: dict[str, str] = {}
    items = [str(f) for f in flags]
    i = 0
    while i < len(items):
        name = items[i]
        if "=" in name and name.startswith("--"):
            name, value = name.split("=", 1)
            i += 1
        else:
            has_value = i + 1 < len(items) and not items[i + 1].startswith("--")
            value = items[i + 1] if has_value else "true"
            i += 2 if has_value else 1
        if name not in NOT_RECIPE:
            values[name] = value
    return values


def recipe_of(flags: list[str] | tuple[str, ...]) -> dict:
    """What a run is keyed by: its flags, and the fingerprint of the model it starts from."""
    values = flag_values(flags)
    return {"flags": values, "base": fingerprint(values.get("--model_name_or_path", ""))}


def stale_reason(output_dir: str | Path, flags: list[str] | tuple[str, ...]) -> str | None:
    """None if `output_dir` holds a finished run of exactly this recipe; else why it cannot be reused."""
    summary = Path(output_dir) / SUMMARY
    if not summary.is_file():
        return "not trained yet" if not Path(output_dir).exists() else NOT_FINISHED
    recorded = json.loads(summary.read_text()).get("recipe")
    if recorded is None:
        return "trained by an older version of the course, which did not record its recipe"
    wanted = recipe_of(flags)
    old, new = recorded["flags"], wanted["flags"]
    changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if changed:
        return "trained with other flags: " + "; ".join(f"{k} {old.get(k, '(unset)')} then, "
                                                         f"{new.get(k, '(unset)')} now" for k in changed[:3])
    if recorded["base"] != wanted["base"]:
        return f"its starting model {new.get('--model_name_or_path')} has been rebuilt or retrained since"
    return None


def resumable(output_dir: str | Path, flags: list[str] | tuple[str, ...]) -> str | None:
    """The checkpoint to resume from, if `output_dir` holds an interrupted run of exactly this recipe."""
    folder = Path(output_dir)
    if (folder / SUMMARY).is_file() or not (folder / RECIPE).is_file():
        return None
    if json.loads((folder / RECIPE).read_text()) != recipe_of(flags):
        return None
    return latest_complete_checkpoint(folder)


def set_aside(folder: Path) -> Path | None:
    """Move a stale folder to `<name>.stale` (replacing an older one), so that nothing is lost silently."""
    if not folder.exists():
        return None
    aside = folder.with_name(folder.name + ".stale")
    shutil.rmtree(aside, ignore_errors=True)
    folder.rename(aside)
    return aside


def _say(folder: Path, reason: str | None, aside: Path | None, same: str, verb: str) -> None:
    if reason is None:
        print(f"reusing {folder}: {same}", flush=True)
    else:
        kept = f"; the old one is kept as {aside.name}" if aside else ""
        print(f"{verb} {folder}: {reason}{kept}", flush=True)


def train_once(*flags: str, ranks: int | None = None) -> Path:
    """`run_zero2(*flags)` unless `--output_dir` already holds this recipe's finished run; an interrupted run of
    it with a complete checkpoint is resumed. Returns the folder."""
    from course_lib.training.launch import run_zero2

    folder = Path(flags[list(flags).index("--output_dir") + 1])
    reason = stale_reason(folder, flags)
    checkpoint = resumable(folder, flags) if reason == NOT_FINISHED else None
    if checkpoint:
        print(f"resuming {folder} from {Path(checkpoint).name}: it was interrupted there", flush=True)
        run_zero2(*flags, "--resume_from_checkpoint", "auto", ranks=ranks)
        return folder
    aside = set_aside(folder) if reason is not None else None
    _say(folder, reason, aside, "trained with these flags from the same starting model", "training")
    if reason is not None:
        run_zero2(*flags, ranks=ranks)
    return folder


def build_once(out: str | Path, vision: str = "tiny", llm: str = "tiny") -> Path:
    """`course_lib.build` into `out` unless it already holds an empty LLaVA of these backbones; returns `out`."""
    from course_lib.build import BUILT_FROM, build_llava, built_from

    out = Path(out)
    record = out / BUILT_FROM
    wanted = built_from(vision, llm)
    if record.is_file() and json.loads(record.read_text()) == wanted:
        reason = None
    else:
        reason = ("not built yet" if not out.exists() else
                  "built from other backbones (the tiny world was rebuilt, or other models)" if record.is_file()
                  else "built by an older version of the course, which did not record its backbones")
    aside = set_aside(out) if reason is not None else None
    _say(out, reason, aside, "built from the same backbones", "building")
    if reason is not None:
        build_llava(vision, llm, out)  # which writes built_from.json
    return out
