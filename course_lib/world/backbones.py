"""The tiny world: small CLIP, tokenizer and Qwen2 LM, trained from scratch here, cached on disk.

They stand in for `openai/clip-vit-large-patch14-336` and `Qwen/Qwen2.5-*-Instruct`: same model
classes, same file formats, same special tokens and chat template. Everything downstream loads them
with `from_pretrained`, so the real loading code is what runs.

`ensure_tiny_world()` builds on first use (7-10 minutes on 2 CPU cores) and then reuses the cache,
keyed by a hash of the config. A file lock keeps parallel processes (pytest, notebooks) from building
twice; every part is written to a temporary folder and renamed into place, so a killed build never
leaves a half-written model behind.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image
from tqdm.auto import tqdm
from transformers import set_seed

from course_lib.model.chat_template import QWEN2_5_TEMPLATE
from course_lib.world.scenes import (
    WorldSpec,
    caption,
    described_chat,
    random_scene,
    text_only_qa,
    world_texts,
    write_world,
)

if TYPE_CHECKING:
    from transformers import Qwen2Tokenizer

# Bump when the building code or a default changes the artefacts: the cache key hashes it with the config.
BUILD_VERSION = 5
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


@dataclass
class TinyWorldConfig:
    seed: int = 0
    world: WorldSpec = field(default_factory=WorldSpec)
    tok_vocab_size: int = 512
    # Vision tower: patch 32 on 64 px gives 4 image tokens, one per cell of the scene's 2x2 grid, so each token
    # holds one whole object. At patch 16 an object is spread over 4 tokens and a single token's shape reads
    # back linearly only 80% of the time (99.8% at patch 32): the LM then had to learn to bind "the red
    # object" to its shape across tokens, and stage 2 stalled near 70% (benchmarks/RESULTS.md, "vision features or
    # language model?"; `python -m benchmarks.probes side WORLD` measures the read-back).
    vit_patch_size: int = 32
    vit_hidden_dim: int = 128
    vit_n_blocks: int = 3
    vit_n_heads: int = 4
    vit_sincos_init: bool = True  # position embeddings start as 2D sine-cosine codes (see train_clip)
    # Amplitude of those codes. At patch 32 (one token per 2x2 cell) content outweighs scale 1: the side
    # (left/right) of an occupied cell's token reads back linearly from its layer -2 feature 88.2% of the
    # time, 100% at scale 4 (`python -m benchmarks.probes side WORLD`).
    vit_sincos_scale: float = 4.0
    clip_text_hidden_dim: int = 128
    clip_text_n_blocks: int = 2
    clip_projection_dim: int = 128
    clip_steps: int = 700
    clip_batch_size: int = 64
    clip_lr: float = 1e-3
    lm_hidden_dim: int = 256
    lm_n_blocks: int = 4
    lm_n_heads: int = 4
    lm_n_kv_heads: int = 2
    lm_inter_dim: int = 704
    lm_steps: int = 800
    lm_batch_size: int = 32
    lm_corpus_size: int = 10000
    lm_lr: float = 2e-3
    lm_rope_theta: float = 1000000.0  # Qwen2.5's; Qwen2Config's default 1e4 read described scenes worse

    def key(self) -> str:
        fields = asdict(self)
        # WorldSpec had an unused `extra: dict` field, hashed as {}; it stays in the hash so that every
        # learner's cached world keeps its key (a new key would rebuild it: about 10 minutes).
        fields["world"]["extra"] = {}
        blob = json.dumps({"v": BUILD_VERSION, **fields}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:10]


@dataclass(frozen=True)
class TinyWorld:
    root: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    @property
    def clip(self) -> Path:
        return self.root / "clip"

    @property
    def llm(self) -> Path:
        return self.root / "qwen2"


def cache_home() -> Path:
    """`$COURSE_LIB_HOME`, else `~/.cache/course_lib`."""
    return Path(os.environ.get("COURSE_LIB_HOME", Path.home() / ".cache" / "course_lib"))


def _locked(path: Path):
    """An exclusive lock on `path`, so parallel processes build the world once."""
    from course_lib.util.files import exclusive_lock

    return exclusive_lock(path, "$COURSE_LIB_HOME")


def _build_part(target: Path, builder) -> None:
    """Run `builder(tmp_dir)` and rename the result into place: all or nothing."""
    if target.exists():
        return
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    builder(tmp)
    os.replace(tmp, target)


def ensure_tiny_world(cfg: TinyWorldConfig | None = None, root: Path | None = None) -> TinyWorld:
    """Build (once) and return the tiny world's data, tokenizer, CLIP and Qwen2 LM folders."""
    cfg = cfg or TinyWorldConfig()
    world = TinyWorld(Path(root) if root else cache_home() / f"tiny-{cfg.key()}")
    done = world.root / "DONE"
    if done.exists():
        return world
    with _locked(world.root.with_name(world.root.name + ".lock")):
        if done.exists():
            return world
        world.root.mkdir(parents=True, exist_ok=True)
        # Said first, so whichever notebook or command happens to come first does not just seem to hang.
        took = ("7-10 minutes on 2 idle CPU cores (14 in another measured run)" if cfg == TinyWorldConfig()
                else "a config of your own")
        print(f"building the tiny world once, into {world.root}: {took}; every later call returns at once", flush=True)
        _build_part(world.data, lambda d: write_world(d, cfg.world))
        _build_part(world.tokenizer, lambda d: train_tokenizer(cfg).save_pretrained(d))
        _build_part(world.clip, lambda d: train_clip(cfg, world, d))
        _build_part(world.llm, lambda d: train_llm(cfg, world, d))
        (world.root / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
        done.write_text("ok\n")
    return world


def train_tokenizer(cfg: TinyWorldConfig) -> Qwen2Tokenizer:
    """A byte-level BPE with Qwen2's pre-tokenizer, Qwen2.5's special tokens and chat template."""
    from tokenizers import Tokenizer, models, trainers
    from transformers import Qwen2Tokenizer

    pre_tokenizer = Qwen2Tokenizer()._tokenizer.pre_tokenizer  # Qwen2's regex split + byte level
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizer
    from tokenizers.pre_tokenizers import ByteLevel

    trainer = trainers.BpeTrainer(vocab_size=cfg.tok_vocab_size, initial_alphabet=ByteLevel.alphabet(),
                                  show_progress=False)
    from course_lib.model.chat_template import QWEN_DEFAULT_SYSTEM

    texts = world_texts(cfg.world) + [QWEN_DEFAULT_SYSTEM, "system\nuser\nassistant\n"]
    bpe.train_from_iterator(texts, trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    # Qwen2.5-Instruct: eos is <|im_end|>, pad is <|endoftext|>, no bos, no unk.
    # Added in Qwen's order, so the three ids are consecutive as in Qwen (151643, 151644, 151645).
    tok = Qwen2Tokenizer(vocab=model["vocab"], merges=merges, unk_token=None, bos_token=None,
                         eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
    tok.eos_token = "<|im_end|>"
    tok.chat_template = QWEN2_5_TEMPLATE
    tok.model_max_length = 32768
    return tok


def _lr_lambda(steps: int, warmup: int = 30):
    # Linear warm-up *times* a cosine over all steps: not transformers' get_cosine_schedule_with_warmup,
    # whose cosine starts after the warm-up. Kept as it is, because the world's weights (and every
    # recorded score) come from this schedule; changing it would rebuild every learner's cached world.
    return lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))


def _train_loop(model, batches, steps: int, lr: float, desc: str) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(steps))
    losses = []
    model.train()
    for _ in (bar := tqdm(range(steps), desc=desc, mininterval=2)):
        loss = model(**next(batches)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval()
    return losses


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """[grid*grid, dim] fixed 2D sine-cosine position codes, row-major (MAE's get_2d_sincos_pos_embed):
    half the channels code the column, half the row, each at dim/4 frequencies."""
    freqs = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                                indexing="ij")

    def code(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * freqs
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([code(cols), code(rows)], dim=1).float()


def _init_sincos_positions(embeddings, scale: float = 1.0) -> None:
    """Start the ViT's learned position embeddings from 2D sine-cosine codes (the class token's at zero).

    With CLIP's default small random init, a patch's own column could be read back linearly from its
    layer -2 feature only 83% of the time (99.8% from this start): content drowned the position, and
    the LM could not answer left/right (60%, near chance). The codes stay trainable; this is only
    where training starts."""
    weight = embeddings.position_embedding.weight
    grid = int(round((weight.shape[0] - 1) ** 0.5))
    with torch.no_grad():
        weight[0].zero_()
        weight[1:] = scale * sincos_2d(grid, weight.shape[1])


def train_clip(cfg: TinyWorldConfig, world: TinyWorld, out: Path) -> None:
    """Contrastive CLIP pretraining on the world's pretrain images and captions (Radford et al. 2021)."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel

    set_seed(cfg.seed)
    tok = AutoTokenizer.from_pretrained(world.tokenizer)
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    # CLIPTextConfig defaults to bos/eos 49406/49407 and pad 1: set all three to our own ids.
    # (An eos id of exactly 2 would switch CLIP's text pooling to its legacy argmax path.)
    assert eos != 2
    text_cfg = dict(vocab_size=len(tok), hidden_size=cfg.clip_text_hidden_dim,
                    intermediate_size=4 * cfg.clip_text_hidden_dim, num_hidden_layers=cfg.clip_text_n_blocks,
                    num_attention_heads=4, max_position_embeddings=64, bos_token_id=eos, eos_token_id=eos,
                    pad_token_id=eos)
    size = cfg.world.image_size
    vision_cfg = dict(image_size=size, patch_size=cfg.vit_patch_size, hidden_size=cfg.vit_hidden_dim,
                      intermediate_size=4 * cfg.vit_hidden_dim, num_hidden_layers=cfg.vit_n_blocks,
                      num_attention_heads=cfg.vit_n_heads)
    model = CLIPModel(CLIPConfig(text_config=text_cfg, vision_config=vision_cfg,
                                 projection_dim=cfg.clip_projection_dim))
    if cfg.vit_sincos_init:
        _init_sincos_positions(model.vision_model.embeddings, cfg.vit_sincos_scale)
    # The OpenAI CLIP preprocessing (resize shortest edge, centre crop, OpenAI mean/std) at our size.
    processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})

    records = json.loads((world.data / "pretrain" / "chat.json").read_text())
    images = [Image.open(world.data / "pretrain" / "images_dl" / r["image"]).convert("RGB") for r in records]
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    captions = [r["conversations"][1]["value"] + "<|endoftext|>" for r in records]
    text = tok(captions, padding="max_length", max_length=32, truncation=True, return_tensors="pt")
    gen = torch.Generator().manual_seed(cfg.seed)

    def batches():
        while True:
            idx = torch.randint(len(records), (cfg.clip_batch_size,), generator=gen)
            yield dict(pixel_values=pixels[idx], input_ids=text["input_ids"][idx],
                       attention_mask=text["attention_mask"][idx], return_loss=True)

    _train_loop(model, batches(), cfg.clip_steps, cfg.clip_lr, "tiny CLIP (contrastive)")
    model.save_pretrained(out)
    processor.save_pretrained(out)
    tok.save_pretrained(out)


def _lm_corpus(cfg: TinyWorldConfig, tok) -> list[str]:
    """Captions, plus chats in Qwen's ChatML: questions about scenes described in words, and text-only
    knowledge. Image questions without their scene are left out: their answers cannot be predicted, so
    they only taught the LM to guess (the first tiny LM got 32% on the text-only questions)."""
    rng = random.Random(cfg.seed + 2)
    n = cfg.lm_corpus_size
    texts = [caption(random_scene(rng, cfg.world.max_objects)) + "<|endoftext|>" for _ in range(n // 5)]
    max_turns = cfg.world.max_turns
    chats = [described_chat(rng, cfg.world.max_objects, max_turns=max_turns) for _ in range(n // 2)]
    chats += [[text_only_qa(rng)[1:] for _ in range(rng.randint(1, max_turns))] for _ in range(n - n // 5 - n // 2)]
    for turns in chats:
        msgs = [m for q, a in turns for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
        texts.append(tok.apply_chat_template(msgs, tokenize=False))
    return texts


def train_llm(cfg: TinyWorldConfig, world: TinyWorld, out: Path) -> None:
    """A Qwen2-shaped causal LM, pretrained briefly on the world's text."""
    from transformers import AutoTokenizer, GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    set_seed(cfg.seed)
    tok = AutoTokenizer.from_pretrained(world.tokenizer)
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    # Like Qwen2.5 (151936 rows for 151665 tokens), the embedding has spare rows: a multiple of 64.
    vocab = (len(tok) + 1 + 63) // 64 * 64
    # Qwen2's bos/eos/pad default to None; set them as in Qwen2.5-Instruct's config.
    config = Qwen2Config(vocab_size=vocab, hidden_size=cfg.lm_hidden_dim, intermediate_size=cfg.lm_inter_dim,
                         num_hidden_layers=cfg.lm_n_blocks, num_attention_heads=cfg.lm_n_heads,
                         num_key_value_heads=cfg.lm_n_kv_heads, max_position_embeddings=4096,
                         rope_theta=cfg.lm_rope_theta, tie_word_embeddings=False,
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"])
    model = Qwen2ForCausalLM(config)
    enc = tok(_lm_corpus(cfg, tok), padding="longest", padding_side="right", return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    gen = torch.Generator().manual_seed(cfg.seed)

    def batches():
        while True:
            idx = torch.randint(len(labels), (cfg.lm_batch_size,), generator=gen)
            width = int(enc["attention_mask"][idx].sum(1).max())  # right padding: drop all-pad columns
            yield dict(input_ids=enc["input_ids"][idx, :width], attention_mask=enc["attention_mask"][idx, :width],
                       labels=labels[idx, :width])

    _train_loop(model, batches(), cfg.lm_steps, cfg.lm_lr, "tiny Qwen2 LM")
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"], eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"])
    model.save_pretrained(out)
    tok.save_pretrained(out)
