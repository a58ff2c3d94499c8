"""Training: what each stage and train type trains, checkpoints, resume, merge, and one-line errors."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlavaForConditionalGeneration, TrainerCallback

from course_lib import train
from course_lib.training.trainable import prepare_model

REPO = Path(__file__).resolve().parents[1]


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _parts(state: dict, part: str) -> dict:
    return {k: v for k, v in state.items() if f"{part}." in k}


@pytest.fixture(scope="module")
def small_data(tiny_world, tmp_path_factory):
    """48 instruct samples (multi-turn, two-image and text-only included) and 48 captions."""
    out = tmp_path_factory.mktemp("small_data")
    inst = json.loads((tiny_world.data / "instruct" / "instruct.json").read_text())[:48]
    (out / "instruct.json").write_text(json.dumps(inst))
    pre = json.loads((tiny_world.data / "pretrain" / "chat.json").read_text())[:48]
    (out / "pretrain.json").write_text(json.dumps(pre))
    return {"instruct": ["--data_path", str(out / "instruct.json"),
                         "--image_folder", str(tiny_world.data / "instruct" / "images")],
            "pretrain": ["--data_path", str(out / "pretrain.json"),
                         "--image_folder", str(tiny_world.data / "pretrain" / "images_dl")]}


FAST = ["--max_steps", "3", "--per_device_train_batch_size", "4", "--logging_steps", "1", "--report_to", "none",
        "--learning_rate", "1e-2", "--seed", "0", "--warmup_steps", "0"]


@pytest.fixture(scope="module")
def stage1(empty_llava, small_data, tmp_path_factory):
    folder, _, _ = empty_llava
    out = tmp_path_factory.mktemp("stage1")
    summary = train.run(["--stage", "pretrain", "--model_name_or_path", str(folder), "--output_dir", str(out),
                         *small_data["pretrain"], *FAST])
    return out, summary


def test_lora_targets_only_the_language_model(empty_llava):
    _, model, _ = empty_llava
    import copy

    peft_model = prepare_model(copy.deepcopy(model), "finetune", "use_lora")
    lora = [n for n, _ in peft_model.named_parameters() if "lora_" in n]
    assert lora and all(".language_model." in n for n in lora)
    assert not any("vision_tower" in n for n, p in peft_model.named_parameters() if p.requires_grad)
    trained = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any("multi_modal_projector" in n and "modules_to_save" in n for n in trained)


@pytest.mark.training
def test_zero_memory_charges_gradients_and_optimizer_to_trainable_parameters_only(empty_llava):
    from course_lib.training.zero import trainable_counts, zero_memory_gb

    folder, _, _ = empty_llava
    counts = trainable_counts(lambda: LlavaForConditionalGeneration.from_pretrained(folder))
    model = LlavaForConditionalGeneration.from_pretrained(folder)
    n = sum(p.numel() for p in model.parameters())
    projector = sum(p.numel() for p in model.model.multi_modal_projector.parameters())
    vision = sum(p.numel() for p in model.model.vision_tower.parameters())
    assert counts["pretrain"] == (n, projector) and counts["none"] == (n, n)
    assert counts["freeze_vision"] == (n, n - vision)
    total, trainable = counts["use_lora"]  # the adapters and the projector's trainable copy (modules_to_save)
    assert total - n == trainable and projector < trainable < n // 10
    gib = 2 ** 30
    assert zero_memory_gb(n, 1, 0) == 16 * n / gib  # all trainable: 16 bytes each
    assert zero_memory_gb(n, 8, 2, trainable=projector) == (2 * n + 14 * projector / 8) / gib  # frozen: 2 bytes
    assert zero_memory_gb(n, 8, 3, trainable=0) == 2 * n / 8 / gib


def test_stage1_trains_only_the_projector_and_saves_a_complete_llava(empty_llava, stage1):
    folder, _, _ = empty_llava
    out, summary = stage1
    before = LlavaForConditionalGeneration.from_pretrained(folder).state_dict()
    after = LlavaForConditionalGeneration.from_pretrained(out).state_dict()
    for part in ("vision_tower", "language_model", "lm_head"):
        for k, v in _parts(before, part).items():
            assert torch.equal(v, after[k]), k
    assert all(not torch.equal(v, after[k]) for k, v in _parts(before, "multi_modal_projector").items())
    assert (out / "projector.safetensors").is_file() and (out / "loss_curve.png").is_file()
    assert (out / "processor_config.json").is_file() and summary["steps"] == 3
    from safetensors.torch import load_file

    alone = load_file(out / "projector.safetensors")
    assert torch.equal(alone["linear_1.weight"], after["model.multi_modal_projector.linear_1.weight"])


@pytest.mark.training
@pytest.mark.parametrize("train_type,trained,frozen", [
    ("freeze_vision", ("multi_modal_projector", "language_model", "lm_head"), ("vision_tower",)),
    ("none", ("multi_modal_projector", "language_model", "lm_head", "vision_tower"), ()),
    # Compared after merging: the LoRA deltas are folded into the language model's linear layers.
    ("use_lora", ("multi_modal_projector", "language_model"), ("vision_tower", "lm_head")),
])
def test_stage2_train_types_change_exactly_their_modules(stage1, small_data, tmp_path, train_type, trained, frozen):
    base, _ = stage1
    before = LlavaForConditionalGeneration.from_pretrained(base).state_dict()
    out = tmp_path / train_type
    train.run(["--stage", "finetune", "--train_type", train_type, "--model_name_or_path", str(base),
               "--output_dir", str(out), *small_data["instruct"], *FAST])
    if train_type == "use_lora":
        from course_lib.merge import merge_lora

        assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
        after = merge_lora(out, tmp_path / "merged").state_dict()
    else:
        after = LlavaForConditionalGeneration.from_pretrained(out).state_dict()
    for part in frozen:
        for k, v in _parts(before, part).items():
            assert torch.equal(v, after[k]), f"{part} changed: {k}"
    for part in trained:
        assert any(not torch.equal(v, after[k]) for k, v in _parts(before, part).items()), f"{part} unchanged"


@pytest.mark.training
def test_merged_lora_gives_the_same_logits_as_base_plus_adapter(stage1, small_data, tmp_path):
    from peft import PeftModel

    from course_lib.merge import merge_lora

    base, _ = stage1
    out = tmp_path / "lora"
    train.run(["--stage", "finetune", "--train_type", "use_lora", "--model_name_or_path", str(base),
               "--output_dir", str(out), *small_data["instruct"], *FAST])
    merge_lora(out, tmp_path / "merged")
    merged = LlavaForConditionalGeneration.from_pretrained(tmp_path / "merged").eval()
    peft = PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(base), out).eval()
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, peft(input_ids=ids).logits, atol=1e-5)


@pytest.mark.training
def test_packing_and_gradient_checkpointing_train_lora(stage1, small_data, tmp_path):
    """The speed switches on a LoRA run: packed padding-free batches and checkpointed layers still train."""
    base, _ = stage1
    summary = train.run(["--stage", "finetune", "--train_type", "use_lora", "--model_name_or_path", str(base),
                         "--output_dir", str(tmp_path / "p"), *small_data["instruct"], *FAST, "--packing", "true",
                         "--gradient_checkpointing", "true"])
    losses = [loss for _, loss in summary["losses"]]
    assert len(losses) == 3 and all(loss == loss and loss > 0 for loss in losses)  # finite, non-zero
    from safetensors.torch import load_file

    lora_b = [v for k, v in load_file(tmp_path / "p" / "adapter_model.safetensors").items() if "lora_B" in k]
    assert any(v.abs().max() > 0 for v in lora_b)  # LoRA B starts at zero: it moved, so gradients flowed


@pytest.mark.training
def test_partial_lora_changes_only_image_positions_and_reloads(stage1, small_data, tmp_path):
    """Partial LoRA: text-only logits stay the stage-1 model's; image prompts change; the output reloads."""
    from course_lib.data.image_tokens import num_image_tokens
    from course_lib.model.partial_lora import ATTR
    from course_lib.serving.loading import LoadError, load_trained

    base, _ = stage1
    out = tmp_path / "partial"
    train.run(["--stage", "finetune", "--train_type", "partial_lora", "--model_name_or_path", str(base),
               "--output_dir", str(out), *small_data["instruct"], *FAST])
    # A standard Llava checkpoint (no adapter keys) + the adapters beside it; the weights are stage 1's.
    before = LlavaForConditionalGeneration.from_pretrained(base).eval()
    plain = LlavaForConditionalGeneration.from_pretrained(out).eval()
    after = plain.state_dict()
    for k, v in before.state_dict().items():
        if "multi_modal_projector" not in k:
            assert torch.equal(v, after[k]), k
    assert (out / "partial_lora.safetensors").is_file()
    loaded = load_trained(out, device="cpu", dtype=torch.float32)
    adapters = getattr(loaded.model, ATTR)
    assert adapters and all("language_model" in k for k in adapters.keys())
    assert any(v.abs().max() > 0 for k, v in adapters.state_dict().items() if "lora_B" in k)  # B moved from 0
    image_id = loaded.model.config.image_token_id
    text = torch.tensor([[5, 17, 42, 99, 3]])
    with_image = torch.tensor([[5] + [image_id] * num_image_tokens(loaded.model.config.vision_config) + [17, 42]])
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded.model(input_ids=text).logits, plain(input_ids=text).logits)
        a = loaded.model(input_ids=with_image, pixel_values=pixels).logits
        b = plain(input_ids=with_image, pixel_values=pixels).logits
    assert torch.equal(a[:, :1], b[:, :1])  # before the image: untouched
    assert (a[:, 1:] - b[:, 1:]).abs().max() > 1e-4  # image tokens (and what attends to them) changed
    with pytest.raises(LoadError, match="cannot be merged"):
        load_trained(out, merge_lora=True)


class _Kill(TrainerCallback):
    """Simulates a run killed at the start of step `at` (after checkpoint at-1 was written)."""

    def __init__(self, at):
        self.at = at

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            raise KeyboardInterrupt


@pytest.mark.training
@pytest.mark.parametrize("train_type", ["freeze_vision", "use_lora", "partial_lora"])
def test_kill_and_resume_matches_an_uninterrupted_run(stage1, small_data, tmp_path, train_type):
    base, _ = stage1
    common = ["--stage", "finetune", "--train_type", train_type, "--model_name_or_path", str(base),
              *small_data["instruct"], *FAST[2:], "--max_steps", "6", "--save_strategy", "steps",
              "--save_steps", "3"]
    train.run([*common, "--output_dir", str(tmp_path / "straight")])
    with pytest.raises(KeyboardInterrupt):
        train.run([*common, "--output_dir", str(tmp_path / "killed")], callbacks=[_Kill(4)])
    # A half-written later checkpoint (no trainer_state.json) must be ignored by --resume auto.
    (tmp_path / "killed" / "checkpoint-5").mkdir()
    summary = train.run([*common, "--output_dir", str(tmp_path / "killed"), "--resume_from_checkpoint", "auto"])
    assert summary["steps"] == 6
    from safetensors.torch import load_file

    name = {"use_lora": "adapter_model.safetensors", "partial_lora": "partial_lora.safetensors"}.get(
        train_type, "model.safetensors")
    a, b = load_file(tmp_path / "straight" / name), load_file(tmp_path / "killed" / name)
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


@pytest.mark.parametrize("extra,expected", [
    (["--train_type", "lora_plus"], "--train_type 'lora_plus' is not one of"),
    (["--stage", "finetune", "--model_name_or_path", "{empty}"], "has no stage-1 projector"),
    (["--data_path", "/no/such/data.json"], "--data_path /no/such/data.json: no such file"),
    (["--deepspeed", "{bad_json}"], "not valid JSON"),
])
def test_bad_arguments_get_one_line_errors(empty_llava, small_data, tmp_path, capsys, extra, expected):
    bad = tmp_path / "ds.json"
    bad.write_text("{stage: 2,}")
    folder, _, _ = empty_llava
    extra = [x.format(empty=folder, bad_json=bad) for x in extra]
    argv = ["--model_name_or_path", str(folder), *small_data["instruct"], "--output_dir", str(tmp_path / "o"),
            *extra]
    assert train.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and expected in err, err


# haotian-liu/LLaVA scripts/zero2.json, verbatim: `--deepspeed` must accept it with its "auto" values.
LLAVA_ZERO2 = {"fp16": {"enabled": "auto", "loss_scale": 0, "loss_scale_window": 1000, "initial_scale_power": 16,
                        "hysteresis": 2, "min_loss_scale": 1},
               "bf16": {"enabled": "auto"}, "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
               "gradient_accumulation_steps": "auto",
               "zero_optimization": {"stage": 2, "overlap_comm": True, "contiguous_gradients": True,
                                     "sub_group_size": 1e9, "reduce_bucket_size": "auto"}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.launcher
def test_run_zero2_two_cpu_ranks_saves_a_loadable_model(empty_llava, small_data, tmp_path):
    """The real launcher: DeepSpeed ZeRO-2, 2 CPU ranks, LLaVA's own zero2.json and a GPU-style command
    line (--bf16 true). Checked on what it saved: a LLaVA that loads with from_pretrained, whose stage-1
    projector trained and whose frozen towers are bit for bit the input's, and a summary of 3 steps over
    2 ranks."""
    from safetensors.torch import load_file

    folder, _, _ = empty_llava
    (tmp_path / "zero2.json").write_text(json.dumps(LLAVA_ZERO2))
    port = _free_port()  # it names this run's shared-memory buffers, not those of other DeepSpeed jobs
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "NUM_PROCS": "2",
           "MASTER_PORT": str(port)}
    cmd = ["bash", str(REPO / "run_zero2.sh"), "--stage", "pretrain", "--model_name_or_path", str(folder),
           *small_data["pretrain"], "--output_dir", str(tmp_path / "ds"), *FAST, "--bf16", "true",
           "--deepspeed", str(tmp_path / "zero2.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))  # DeepSpeed's 2 x 67 MB, removed
    assert "training starts" in proc.stdout  # the launch reports its start-up time
    out = tmp_path / "ds"
    model = LlavaForConditionalGeneration.from_pretrained(out)
    assert model.config.model_type == "llava"
    before = LlavaForConditionalGeneration.from_pretrained(folder).state_dict()
    after = model.state_dict()
    assert before.keys() == after.keys()
    for part in ("vision_tower", "language_model", "lm_head"):  # frozen in stage 1: bit-identical
        for k, v in _parts(before, part).items():
            assert torch.equal(v.to(after[k].dtype), after[k]), k
    projector = _parts(before, "multi_modal_projector")
    assert projector and all(not torch.equal(v.to(after[k].dtype), after[k]) for k, v in projector.items())
    alone = load_file(out / "projector.safetensors")  # the stage-1 projector file is the saved model's
    assert torch.equal(alone["linear_1.weight"], after["model.multi_modal_projector.linear_1.weight"].float())
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["stage"] == "pretrain" and summary["steps"] == 3, summary
    assert [step for step, _ in summary["losses"]] == [1, 2, 3], summary["losses"]
    # 48 samples, 4 per rank per step: an epoch is 6 steps on 2 ranks (12 on one), so 3 steps are half of it.
    assert summary["samples"] == 48 and summary["epochs"] == 0.5, summary


def _launch(args: list[str], output_dir: Path, **env: str) -> subprocess.Popen:
    """`bash run_zero2.sh ARGS --output_dir OUTPUT_DIR` with 2 CPU ranks unless `env` says otherwise."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "NUM_PROCS": "2", **env}
    return subprocess.Popen(["bash", str(REPO / "run_zero2.sh"), *args, "--output_dir", str(output_dir)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-3000:]
    return out


def _trained(args: list[str], output_dir: Path, **env: str) -> str:
    return _finish(_launch(args, output_dir, **env))


@pytest.mark.launcher
def test_two_nodes_train_exactly_as_one_node_with_two_ranks(empty_llava, small_data, tmp_path):
    """NNODES=2 on 127.0.0.1, one rank per "node", launched as two processes with NODE_RANK 0 and 1 (as srun
    does), against NUM_PROCS=2 on one node: the same stage-1 projector, bit for bit."""
    from safetensors.torch import load_file

    folder, _, _ = empty_llava
    port = str(_free_port())
    args = ["--stage", "pretrain", "--model_name_or_path", str(folder), *small_data["pretrain"], *FAST]
    nodes = [_launch(args, tmp_path / "nodes", NNODES="2", NODE_RANK=str(r), MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=port, NUM_PROCS="1") for r in (0, 1)]
    for proc in nodes:
        _finish(proc)
    _trained(args, tmp_path / "one_node")
    two, single = load_file(tmp_path / "nodes" / "projector.safetensors"), load_file(tmp_path / "one_node" /
                                                                                    "projector.safetensors")
    assert two.keys() == single.keys() and all(torch.equal(two[k], single[k]) for k in two)
    summary = json.loads((tmp_path / "nodes" / "training_summary.json").read_text())
    assert summary["steps"] == 3 and summary["epochs"] == 0.5  # 48 samples, 2 ranks x 4: the world was 2 ranks


# SGD: its update is linear in the gradient, so ZeRO-3 and ZeRO-2 agree to float32 rounding (6e-8 measured).
# Adam's first steps are about lr * sign(gradient), which turns rounding noise in near-zero gradients into
# whole steps: 1.8e-3 apart after 3 steps at lr 1e-2.
SGD = ["--optim", "sgd", "--learning_rate", "0.1"]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return LlavaForConditionalGeneration.from_pretrained(folder).state_dict()


@pytest.mark.launcher
def test_zero3_full_finetune_equals_zero2_saves_what_it_trained_and_resumes_exactly(stage1, small_data, tmp_path):
    """Stage 2 `none` under configs/zero3.json on 2 CPU ranks, which partitions every weight over the ranks."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from course_lib.model.parameters import format_table
    from course_lib.serving.loading import load_trained

    base, _ = stage1
    args = ["--stage", "finetune", "--train_type", "none", "--model_name_or_path", str(base),
            *small_data["instruct"], *FAST[2:], *SGD, "--max_steps", "6"]
    saving = ["--save_strategy", "steps", "--save_steps", "3"]
    log = _trained([*args, *saving, "--deepspeed", str(REPO / "configs" / "zero3.json")], tmp_path / "zero3")
    _trained(args, tmp_path / "zero2")  # run_zero2.sh's default: configs/zero2.json
    zero3, zero2, start = _weights(tmp_path / "zero3"), _weights(tmp_path / "zero2"), _weights(base)
    assert zero3.keys() == zero2.keys() == start.keys()
    assert max((zero3[k] - zero2[k]).abs().max().item() for k in zero3) < 1e-6
    # Weights no gradient reaches (CLIP's last layer: LLaVA reads the one before) come back bit for bit.
    untouched = [k for k in start if torch.equal(start[k], zero2[k])]
    assert any("vision_tower" in k for k in untouched) and all(torch.equal(start[k], zero3[k]) for k in untouched)
    # The parameter table counts the real weights, not the empty tensors ZeRO-3 leaves on each rank.
    table = json.loads((tmp_path / "zero3" / "training_summary.json").read_text())["param_table"]
    assert table[-1]["total"] == table[-1]["trainable"] == sum(v.numel() for v in start.values())
    assert format_table(table) in log  # and so does the table the run printed
    # The saved model is what the optimizer held: DeepSpeed's own zero_to_fp32 rebuilds it from the partitions.
    held = get_fp32_state_dict_from_zero_checkpoint(str(tmp_path / "zero3" / "checkpoint-6"))
    assert held.keys() == zero3.keys() and all(torch.equal(held[k], zero3[k]) for k in held)
    model = load_trained(tmp_path / "zero3", device="cpu").model
    batch = {"input_ids": torch.tensor([[1, 2, 3, 4]])}
    reference = LlavaForConditionalGeneration.from_pretrained(base)
    reference.load_state_dict(held)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reference.eval()(**batch).logits)
    # Resumed from the ZeRO-3 checkpoint at step 3 (partitioned optimizer states and all): the same model.
    (tmp_path / "resumed").mkdir()
    os.rename(tmp_path / "zero3" / "checkpoint-3", tmp_path / "resumed" / "checkpoint-3")
    _trained([*args, *saving, "--deepspeed", str(REPO / "configs" / "zero3.json"), "--resume_from_checkpoint",
              "auto"], tmp_path / "resumed")
    resumed = _weights(tmp_path / "resumed")
    assert all(torch.equal(resumed[k], zero3[k]) for k in zero3)


@pytest.mark.launcher
def test_zero3_lora_and_offload_train_as_without_them(stage1, small_data, tmp_path):
    """Stage 2 `use_lora` under ZeRO-3 gives ZeRO-2's adapter; ZeRO-3 with CPU offload gives ZeRO-3's model."""
    from safetensors.torch import load_file

    from course_lib.serving.loading import load_trained

    base, _ = stage1
    lora = ["--stage", "finetune", "--train_type", "use_lora", "--model_name_or_path", str(base),
            *small_data["instruct"], *FAST[2:], *SGD]
    _trained([*lora, "--deepspeed", str(REPO / "configs" / "zero3.json")], tmp_path / "lora3")
    _trained(lora, tmp_path / "lora2")
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("lora3", "lora2"))
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    merged = load_trained(tmp_path / "lora3", device="cpu", merge_lora=True).model.state_dict()
    start = _weights(base)
    assert all(torch.equal(merged[k], v) for k, v in start.items() if "vision_tower" in k)  # frozen
    # Offload (configs/zero3_offload.json) with the Trainer's AdamW, against ZeRO-3 alone. A torch SGD
    # optimizer is not compared: DeepSpeed's offload trains differently with it (step-2 loss 9.62 against 5.61).
    full = ["--stage", "finetune", "--train_type", "none", "--model_name_or_path", str(base),
            *small_data["instruct"], *FAST]
    _trained([*full, "--deepspeed", str(REPO / "configs" / "zero3_offload.json")], tmp_path / "offload")
    _trained([*full, "--deepspeed", str(REPO / "configs" / "zero3.json")], tmp_path / "zero3")
    losses = [json.loads((tmp_path / d / "training_summary.json").read_text())["losses"] for d in ("offload", "zero3")]
    assert [s for s, _ in losses[0]] == [1, 2, 3]
    assert all(abs(x - y) < 1e-4 for (_, x), (_, y) in zip(*losses)), losses
    offload, zero3 = _weights(tmp_path / "offload"), _weights(tmp_path / "zero3")
    assert max((offload[k] - zero3[k]).abs().max().item() for k in zero3) < 5e-4  # lr 1e-2: 5% of one step


@pytest.mark.parametrize("env, expected", [
    ({"NNODES": "2", "NODE_RANK": "0"}, "NNODES=2 needs MASTER_ADDR"),
    ({"NNODES": "2", "MASTER_ADDR": "127.0.0.1"}, "NNODES=2 needs NODE_RANK"),
    ({"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "127.0.0.1"}, "NODE_RANK=2 is out of range for NNODES=2"),
    ({"NNODES": "two"}, "expected a number of nodes"),
    ({"HOSTFILE": "/no/such/hostfile"}, "--hostfile /no/such/hostfile: no such file"),
])
def test_run_zero2_bad_node_settings_are_one_line(env, expected, tmp_path):
    proc = subprocess.run(["bash", str(REPO / "run_zero2.sh"), "--output_dir", str(tmp_path / "x")],
                          capture_output=True, text=True, env={**os.environ, **env}, timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [f"error: {proc.stderr.strip()[7:]}"]
    assert expected in proc.stderr and not (tmp_path / "x").exists()


@pytest.mark.launcher
def test_run_zero2_bad_flag_is_one_line(tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.run(["bash", str(REPO / "run_zero2.sh"), "--train_type", "nope", "--output_dir",
                           str(tmp_path)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: --train_type 'nope' is not one of use_lora, freeze_vision, "
                                                "none (or full), partial_lora"]


@pytest.mark.parametrize("flags", [["--train_sampling_strategy", "group_by_length"],
                                   ["--group_by_modality_length", "true"]])
def test_length_grouping_flags_reach_the_sampler(flags, tiny_world, empty_llava, tmp_path):
    """HF's `--train_sampling_strategy group_by_length` (it once raised a TypeError here) and LLaVA's
    `--group_by_modality_length`: batches of the global batch size, never mixing text-only with images."""
    from course_lib.data.collators import PaddedCollator
    from course_lib.data.dataset import LlavaDataset
    from course_lib.data.sampler import LengthGroupedSampler
    from course_lib.training.arguments import parse_args
    from course_lib.training.trainer import make_trainer

    instruct = tiny_world.data / "instruct"
    margs, dargs, targs = parse_args(["--stage", "finetune", "--train_type", "freeze_vision", "--model_name_or_path",
                                      "tiny", "--pretrain_projector", str(_projector_file(tmp_path, empty_llava)),
                                      "--data_path", str(instruct / "instruct.json"), "--image_folder",
                                      str(instruct / "images"), "--output_dir", str(tmp_path / "out"),
                                      "--per_device_train_batch_size", "8", "--report_to", "none", *flags])
    _, model, processor = empty_llava
    dataset = LlavaDataset(instruct / "instruct.json", processor, image_folder=instruct / "images")
    trainer = make_trainer(model, targs, dataset, PaddedCollator(processor.tokenizer.pad_token_id), None, None,
                           group_by_modality=dargs.group_by_modality_length)
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, LengthGroupedSampler) and sampler.batch_size == 8 * targs.world_size
    order = list(sampler)
    assert sorted(order) == list(range(len(dataset)))
    batches = [order[i:i + 8] for i in range(0, len(order) - len(order) % 8, 8)]
    mixed = sum(len({dataset.image_counts[j] > 0 for j in b}) > 1 for b in batches[:-1])
    if dargs.group_by_modality_length:
        assert mixed == 0  # LLaVA's modality grouping: a batch is all images or all text
    spread = [max(dataset.lengths[j] for j in b) - min(dataset.lengths[j] for j in b) for b in batches]
    assert sum(spread) / len(spread) < 0.5 * (max(dataset.lengths) - min(dataset.lengths))


def _projector_file(tmp_path, empty_llava):
    from safetensors.torch import save_file

    path = tmp_path / "projector.safetensors"
    save_file({k: v.contiguous() for k, v in empty_llava[1].model.multi_modal_projector.state_dict().items()}, path)
    return path


def test_tiling_that_cannot_fit_the_max_length_is_refused_up_front():
    """CLIP-L/336: 576 tokens a tile; --image_tiling 4 makes up to 5 images = 2880 tokens > 2048, and every
    image sample would have been dropped as too long."""
    from course_lib.training.arguments import DataArguments, check_tiling_fits
    from course_lib.training.trainable import TrainSetupError

    with pytest.raises(TrainSetupError, match=r"--image_tiling 4: .* 2880 tokens .* over --model_max_length 2048; "
                                              r"raise --model_max_length to at least 2944 or use --image_tiling 2"):
        check_tiling_fits(DataArguments(image_tiling=4, model_max_length=2048), 576)
    check_tiling_fits(DataArguments(image_tiling=2, model_max_length=2048), 576)  # 3 x 576 = 1728 fits
    check_tiling_fits(DataArguments(image_tiling=0, model_max_length=100), 576)  # off: nothing to check


def _mixed_pair(tiny_world, root: Path) -> list[str]:
    """One image sample and one text-only sample: at batch 1 on 2 ranks, each step one rank sees no image."""
    records = json.loads((tiny_world.data / "instruct" / "instruct.json").read_text())
    pair = [next(r for r in records if isinstance(r.get("image"), str)), next(r for r in records if "image" not in r)]
    (root / "pair.json").write_text(json.dumps(pair))
    return ["--data_path", str(root / "pair.json"), "--image_folder", str(tiny_world.data / "instruct" / "images")]


def test_a_text_only_batch_gives_every_trainable_weight_an_exact_zero_gradient(empty_llava, tiny_world, tmp_path):
    """Without it the projector got no gradient at all on that rank (None), and ZeRO-2's reduce-scatter
    mismatched the other ranks'."""
    from transformers import TrainingArguments

    from course_lib.data.collators import PaddedCollator
    from course_lib.data.dataset import LlavaDataset
    from course_lib.training.trainer import make_trainer

    folder, _, processor = empty_llava
    flags = _mixed_pair(tiny_world, tmp_path)
    targs = TrainingArguments(output_dir=str(tmp_path / "o"), report_to="none", use_cpu=True)
    model = prepare_model(LlavaForConditionalGeneration.from_pretrained(folder), "finetune", "freeze_vision",
                          8, 16, 0.0)
    dataset = LlavaDataset(flags[1], processor, image_folder=flags[3], template="chat")
    collator = PaddedCollator(pad_token_id=processor.tokenizer.pad_token_id)
    trainer = make_trainer(model, targs, dataset, collator, None, None)
    batch = collator([dataset[1]])
    assert "pixel_values" not in batch  # the text-only sample
    trainer.compute_loss(model, batch).backward()
    projector = [p for n, p in model.named_parameters() if "multi_modal_projector" in n]
    assert projector and all(p.grad is not None and not p.grad.any() for p in projector)
    language = [p for n, p in model.named_parameters() if "language_model" in n and p.requires_grad]
    assert any(p.grad.any() for p in language)  # the text itself still trains the language model


@pytest.mark.launcher
def test_run_zero2_survives_a_text_only_micro_batch_on_one_rank(empty_llava, tiny_world, tmp_path):
    """2 CPU ranks, batch 1, one image sample and one text-only sample: every step one rank has no image.
    Before the fix gloo died with "Received data size doesn't match expected size"."""
    from safetensors.torch import save_file

    folder, model, _ = empty_llava
    save_file(model.model.multi_modal_projector.state_dict(), tmp_path / "projector.safetensors")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "NUM_PROCS": "2"}
    cmd = ["bash", str(REPO / "run_zero2.sh"), "--stage", "finetune", "--train_type", "freeze_vision",
           "--model_name_or_path", str(folder), "--pretrain_projector", str(tmp_path / "projector.safetensors"),
           *_mixed_pair(tiny_world, tmp_path), "--output_dir", str(tmp_path / "ds"), "--max_steps", "2",
           "--per_device_train_batch_size", "1", "--report_to", "none", "--save_strategy", "no"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "ds" / "training_summary.json").read_text())
    assert summary["steps"] == 2 and summary["samples"] == 2


# haotian-liu/LLaVA scripts/v1_5/pretrain.sh and finetune_lora.sh, flag for flag (paths and LLM substituted;
# LoRA's ZeRO-3 config and wandb are checked separately).
LLAVA_COMMON = ["--vision_tower", "openai/clip-vit-large-patch14-336", "--mm_vision_select_layer", "-2",
                "--mm_use_im_start_end", "False", "--mm_use_im_patch_token", "False", "--bf16", "True",
                "--num_train_epochs", "1", "--per_device_eval_batch_size", "4", "--evaluation_strategy", "no",
                "--save_strategy", "steps", "--save_total_limit", "1", "--weight_decay", "0.",
                "--warmup_ratio", "0.03", "--lr_scheduler_type", "cosine", "--logging_steps", "1",
                "--tf32", "True", "--model_max_length", "2048", "--gradient_checkpointing", "True",
                "--dataloader_num_workers", "0", "--lazy_preprocess", "True", "--report_to", "none"]
LLAVA_PRETRAIN = ["--version", "plain", "--mm_projector_type", "mlp2x_gelu", "--tune_mm_mlp_adapter", "True",
                  "--per_device_train_batch_size", "16", "--gradient_accumulation_steps", "4", "--save_steps",
                  "24000", "--learning_rate", "1e-3", *LLAVA_COMMON]
LLAVA_FINETUNE_LORA = ["--lora_enable", "True", "--lora_r", "128", "--lora_alpha", "256", "--mm_projector_lr", "2e-5",
                       "--version", "qwen_2", "--mm_projector_type", "mlp2x_gelu", "--image_aspect_ratio", "pad",
                       "--group_by_modality_length", "True", "--per_device_train_batch_size", "16",
                       "--gradient_accumulation_steps", "2", "--save_steps", "50000", "--learning_rate", "2e-4",
                       *LLAVA_COMMON]


def test_llava_1_5_script_flags_keep_their_meaning(empty_llava, small_data, tmp_path, capsys):
    from course_lib.training.arguments import parse_args

    folder = str(empty_llava[0])
    margs, dargs, targs = parse_args(["--model_name_or_path", folder, *small_data["pretrain"], "--output_dir",
                                      str(tmp_path / "pre"), *LLAVA_PRETRAIN])
    assert (margs.stage, dargs.template, targs.learning_rate, targs.eval_strategy) == ("pretrain", "plain", 1e-3, "no")
    (tmp_path / "projector.safetensors").write_bytes(b"")
    margs, dargs, targs = parse_args(["--model_name_or_path", folder, "--pretrain_mm_mlp_adapter",
                                      str(tmp_path / "projector.safetensors"), *small_data["instruct"],
                                      "--output_dir", str(tmp_path / "lora"), *LLAVA_FINETUNE_LORA])
    assert (margs.stage, margs.train_type, margs.lora_r, margs.lora_alpha, margs.projector_lr) == (
        "finetune", "use_lora", 128, 256, 2e-5)
    assert dargs.pad_to_square and dargs.group_by_modality_length and dargs.template == "chat"
    assert targs.gradient_checkpointing and not targs.tf32 and not targs.bf16  # CPU: fp32, as the log says
    out = capsys.readouterr().out
    assert "--lazy_preprocess True dropped: this course always tokenizes lazily" in out
    assert "--mm_projector_lr is --projector_lr here" in out


@pytest.mark.parametrize("flags,expected", [
    (["--image_aspect_ratio", "anyres"], "use --image_tiling N"),
    (["--bits", "4"], "--bits 4: not supported here; 4- and 8-bit (QLoRA) training is not supported"),
    (["--pretrain_mm_mlp_adapter", "mm_projector.bin"], "LLaVA's mm_projector.bin is a pickle"),
    (["--mm_vision_select_layer", "-1"], "the feature layer is part of the built model"),
    (["--report_to", "wandb"], "--report_to wandb: not installed (pip install wandb)"),
    (["--lora_enable", "True", "--train_type", "none"], "--lora_enable True sets --train_type use_lora, but"),
])
def test_llava_flags_this_course_does_not_have_name_its_way(empty_llava, small_data, tmp_path, capsys, flags,
                                                             expected):
    argv = ["--model_name_or_path", str(empty_llava[0]), *small_data["instruct"], "--output_dir", str(tmp_path),
            *flags]
    assert train.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and expected in err, err


def test_llava_vision_tower_with_an_llm_names_the_build_command(tiny_world, small_data, tmp_path, capsys):
    argv = ["--model_name_or_path", str(tiny_world.llm), "--vision_tower", "openai/clip-vit-large-patch14-336",
            *small_data["instruct"], "--output_dir", str(tmp_path)]
    assert train.main(argv) == 2
    assert f"python -m course_lib.build --vision openai/clip-vit-large-patch14-336 --llm {tiny_world.llm}" in \
        capsys.readouterr().err


@pytest.mark.training
def test_llava_finetune_lora_flags_train_and_save_a_loadable_adapter(stage1, small_data, tmp_path):
    from course_lib.serving.loading import load_trained

    base, _ = stage1
    out = tmp_path / "lora"
    flags = [f for f in LLAVA_FINETUNE_LORA]
    flags[flags.index("--per_device_train_batch_size") + 1] = "4"
    summary = train.run(["--model_name_or_path", str(base), *small_data["instruct"], "--output_dir", str(out),
                         *flags, "--max_steps", "2", "--save_strategy", "no"])
    assert summary["steps"] == 2 and summary["train_type"] == "use_lora"
    loaded = load_trained(out, device="cpu")
    assert loaded.kind == "lora" and loaded.preprocessing["pad_to_square"]
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 128


@pytest.mark.launcher
def test_run_zero2_reports_unreadable_data_once_before_launching(tmp_path):
    """A Latin-1 data file used to reach every rank, each printing its error, then DeepSpeed's launcher its own."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    data = tmp_path / "latin1.json"
    data.write_bytes('[{"id": "é", "conversations": []}]'.encode("latin-1"))
    proc = subprocess.run(["bash", str(REPO / "run_zero2.sh"), "--model_name_or_path", "tiny", "--data_path",
                           str(data), "--output_dir", str(tmp_path / "out")], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 2 and not (tmp_path / "out").exists()
    assert proc.stderr.strip().splitlines() == [f"error: {data} is not UTF-8 text (byte 0xe9 at offset 9); "
                                                "save it as UTF-8"]


def test_tiny_recipe_keeps_its_global_batch_over_any_number_of_ranks(tmp_path):
    """run_zero2.sh's CPU default is one rank; notebook 04 uses two to show ZeRO sharding. Either way an
    optimizer step sees the recipe's 32 samples, so the runs are the same recipe."""
    from course_lib.training.recipes import main, tiny_flags

    def batch(flags):
        return int(flags[flags.index("--per_device_train_batch_size") + 1])

    for ranks in (1, 2, 4):
        for stage, kind in (("pretrain", None), ("finetune", "freeze_vision")):
            flags = tiny_flags(stage, kind, data=tmp_path, model="m", output_dir="o", ranks=ranks)
            assert batch(flags) * ranks == 32, (ranks, stage)
    with pytest.raises(ValueError, match="ranks 3"):
        tiny_flags("pretrain", data=tmp_path, model="m", output_dir="o", ranks=3)
    assert main(["pretrain", "--model", "m", "--output_dir", "o", "--data", str(tmp_path), "--ranks", "3"]) == 2


def test_a_run_is_reused_only_for_its_own_recipe_world_and_starting_model(stage1, empty_llava, small_data, tmp_path):
    """Notebooks reuse runs/tiny/X only if it holds a finished run of the same flags (the data paths carry the
    tiny world's key) from the same starting folder; anything else is retrained and the old run set aside."""
    import shutil

    from course_lib.build import BUILT_FROM, built_from
    from course_lib.training.runs import NOT_FINISHED, RECIPE, recipe_of, resumable, set_aside, stale_reason

    folder, _, _ = empty_llava
    out, summary = stage1
    flags = ["--stage", "pretrain", "--model_name_or_path", str(folder), "--output_dir", str(out),
             *small_data["pretrain"], *FAST]
    assert summary["recipe"]["flags"]["--model_name_or_path"] == str(folder)
    assert json.loads((out / RECIPE).read_text()) == summary["recipe"]  # written when the run started
    assert stale_reason(out, flags) is None
    assert stale_reason(out, [*flags, "--deepspeed", "configs/zero3.json"]) is None  # ZeRO's config: same math
    lr = flags.index("--learning_rate") + 1
    assert stale_reason(out, [*flags[:lr], "1e-3", *flags[lr + 1:]]) == (
        "trained with other flags: --learning_rate 1e-2 then, 1e-3 now")
    assert stale_reason(out, [*flags, "--lora_r", "4"]) == "trained with other flags: --lora_r (unset) then, 4 now"
    other_world = [f.replace(str(Path(small_data["pretrain"][1]).parent), "/elsewhere") for f in flags]
    assert stale_reason(out, other_world).startswith("trained with other flags: --data_path")
    weights = sorted(folder.glob("*.safetensors"))[0]
    stat = weights.stat()
    try:  # the starting model written again (retrained, rebuilt): same flags, but a stale run
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10 ** 9))
        assert stale_reason(out, flags) == f"its starting model {folder} has been rebuilt or retrained since"
    finally:
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert stale_reason(out, flags) is None

    old = tmp_path / "old_run"
    shutil.copytree(out, old)
    record = json.loads((old / "training_summary.json").read_text())
    del record["recipe"]
    (old / "training_summary.json").write_text(json.dumps(record))
    assert stale_reason(old, flags).startswith("trained by an older version of the course")
    assert set_aside(old) == tmp_path / "old_run.stale" and not old.exists()
    assert (tmp_path / "old_run.stale" / "training_summary.json").is_file()  # kept, not deleted
    assert stale_reason(tmp_path / "never", flags) == "not trained yet"
    # Interrupted after a complete checkpoint: resumed if it is this recipe's, else set aside.
    cut = tmp_path / "cut"
    (cut / "checkpoint-2").mkdir(parents=True)
    (cut / "checkpoint-2" / "trainer_state.json").write_text("{}")
    (cut / RECIPE).write_text(json.dumps(recipe_of(flags)))
    assert stale_reason(cut, flags) == NOT_FINISHED and resumable(cut, flags) == str(cut / "checkpoint-2")
    assert resumable(cut, [*flags, "--save_steps", "500"]) == str(cut / "checkpoint-2")  # saving is not the recipe
    assert resumable(cut, [*flags, "--lora_r", "4"]) is None
    # An empty LLaVA records its backbones; the fixture's was built from the tiny world's folders.
    assert json.loads((folder / BUILT_FROM).read_text()) == built_from("tiny", "tiny")


def test_the_summary_records_the_peak_memory_of_the_run(stage1):
    """In GiB, read from the OS's high-water mark when training ended: never more than this process's peak now,
    and at least what torch and a model take (units wrong by 2**10 would fail one side or the other)."""
    import resource

    _, summary = stage1
    peak = summary["peak_memory_gib"]["resident"]
    assert 0.2 < peak <= resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    assert 0.1 < summary["peak_memory_gib"]["private"] <= peak  # Linux's RssAnon when training ended


@pytest.mark.training
def test_the_validation_loss_is_the_held_out_loss_of_the_saved_model(stage1, small_data, tiny_world, tmp_path):
    """`--eval_data_path`: one validation loss per epoch by default, and the last one is exactly the loss of the
    saved model on the held-out answers (computed here independently, one batch of all 12 samples)."""
    from transformers import AutoProcessor

    from course_lib.data.dataset import LlavaDataset
    from course_lib.lessons.design import eval_loss

    held_out = tmp_path / "eval.json"
    held_out.write_text(json.dumps(json.loads((tiny_world.data / "eval" / "eval.json").read_text())[:12]))
    train_file = tmp_path / "train.json"
    train_file.write_text(json.dumps(json.loads(Path(small_data["instruct"][1]).read_text())[:8]))
    base, _ = stage1
    out = tmp_path / "v"
    summary = train.run(["--stage", "finetune", "--train_type", "freeze_vision", "--model_name_or_path", str(base),
                         "--output_dir", str(out), "--data_path", str(train_file), "--image_folder",
                         small_data["instruct"][3], "--eval_data_path", str(held_out), "--eval_image_folder",
                         str(tiny_world.data / "eval" / "images"), "--per_device_train_batch_size", "4",
                         "--per_device_eval_batch_size", "16", "--num_train_epochs", "2", "--learning_rate", "1e-3",
                         "--report_to", "none", "--logging_steps", "1", "--seed", "0"])
    assert [step for step, _ in summary["eval_losses"]] == [2, 4]
    model = LlavaForConditionalGeneration.from_pretrained(out)
    expected = eval_loss(model, LlavaDataset(held_out, AutoProcessor.from_pretrained(out), template="chat",
                                             image_folder=tiny_world.data / "eval" / "images"))
    assert summary["eval_losses"][-1][1] == pytest.approx(expected, rel=1e-5)
    assert summary["eval_losses"][0][1] != summary["eval_losses"][1][1]
