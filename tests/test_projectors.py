"""Projectors: output shapes and token counts, pixel shuffle's layout, and each one trains on the tiny world."""

import json

import pytest
import torch

from course_lib.model.projectors import PROJECTORS, make_projector, pixel_shuffle

EXPECTED_TOKENS = {"linear": 16, "mlp2x_gelu": 16, "mlp_ln": 16, "pixel_shuffle": 4, "qformer": 8}


@pytest.mark.parametrize("name", sorted(PROJECTORS))
def test_shapes_and_token_counts(name):
    projector = make_projector(name, vision_dim=128, text_dim=256)
    features = torch.randn(3, 16, 128)  # 3 images, a 4x4 patch grid
    out = projector(features)
    assert out.shape == (3, EXPECTED_TOKENS[name], 256)
    assert projector.tokens_out(16) == EXPECTED_TOKENS[name]
    # CLIP-L/336 into Qwen2.5-0.5B: 576 patches of 1024 dims -> 896-dim tokens (InternVL: 576 -> 144).
    big = make_projector(name, vision_dim=1024, text_dim=896)
    assert big.tokens_out(576) == {"pixel_shuffle": 144, "qformer": 8}.get(name, 576)


def test_mlp_matches_hf_llava_projector():
    from transformers import CLIPVisionConfig, LlavaConfig, Qwen2Config
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    config = LlavaConfig(vision_config=CLIPVisionConfig(hidden_size=128, num_attention_heads=4),
                         text_config=Qwen2Config(hidden_size=256, num_attention_heads=4),
                         projector_hidden_act="gelu")
    hf = LlavaMultiModalProjector(config)
    ours = make_projector("mlp2x_gelu", 128, 256)
    ours.load_state_dict(hf.state_dict())  # same parameter names: linear_1, linear_2
    x = torch.randn(2, 16, 128)
    assert torch.allclose(ours(x), hf(x), atol=1e-6)


def test_pixel_shuffle_stacks_each_2x2_block():
    grid = torch.arange(16.0).reshape(1, 16, 1)  # patch k carries the value k; a 4x4 grid, row-major
    out = pixel_shuffle(grid, 2)
    assert out.shape == (1, 4, 4)
    assert out[0].tolist() == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]
    with pytest.raises(ValueError, match="not a square grid"):
        pixel_shuffle(torch.zeros(1, 15, 2))


def test_qformer_queries_read_the_image():
    projector = make_projector("qformer", 32, 64, num_queries=4)
    a, b = torch.randn(1, 16, 32), torch.randn(1, 16, 32)
    assert not torch.allclose(projector(a), projector(b))  # the output depends on the image...
    assert torch.allclose(projector(torch.cat([a, b]))[1], projector(b)[0], atol=1e-5)  # ...of its own row only


@pytest.mark.training  # 25 optimizer steps per projector: 30-75 s each on 2 CPU cores
@pytest.mark.parametrize("name", sorted(PROJECTORS))
def test_each_projector_trains_on_the_tiny_world(name, tiny_world):
    """Stage-1 style: only the projector trains, on 16 captions; its loss must fall by a third in 25 steps."""
    from course_lib.build import build_llava
    from course_lib.data.collators import PaddedCollator
    from course_lib.data.dataset import LlavaDataset
    from course_lib.model.projectors import use_projector
    from course_lib.training.trainable import prepare_model

    model, processor = build_llava(str(tiny_world.clip), str(tiny_world.llm))
    projector = use_projector(model, processor, name)
    model = prepare_model(model, "pretrain")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"model.multi_modal_projector.{n}" for n, _ in projector.named_parameters()}
    data = LlavaDataset(tiny_world.data / "pretrain", processor, template="plain")
    batch = PaddedCollator(processor.tokenizer.pad_token_id)([data[i] for i in range(16)])
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    # The tiny world's 64 px image at patch 32 is a 2x2 grid: 4 patches, 1 token after pixel shuffle.
    assert model.config.vision_config.patch_size == 32
    assert (batch["input_ids"] == image_id).sum(1).tolist() == [{"pixel_shuffle": 1, "qformer": 8}.get(name, 4)] * 16
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    losses = []
    for _ in range(25):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.67 * losses[0], json.dumps(losses)


def test_cross_attention_starts_as_the_language_model_and_reads_the_image_once_its_gate_opens(tiny_world, eval_pngs):
    """Flamingo's gates start at 0: the fused model is bit for bit the language model, whatever the image. With
    the attention gate open the answer depends on the row's own image only; the feed-forward gate then moves
    text-only rows too, which is how these blocks change a frozen language model."""
    from PIL import Image
    from transformers import AutoModelForCausalLM

    from course_lib.build import build_llava
    from course_lib.model.cross_attention import use_cross_attention

    model, processor = build_llava(str(tiny_world.clip), str(tiny_world.llm))
    fusion = use_cross_attention(model, processor, every=2)
    model.eval()
    assert len(fusion.blocks) == 2 and processor.image_seq_length == 1
    tok = processor.tokenizer
    tok.padding_side = "right"  # the one-image row keeps its positions
    text = tok(["What is 3 plus 4?"], return_tensors="pt")
    llm = AutoModelForCausalLM.from_pretrained(tiny_world.llm).eval()
    images = [Image.open(p).convert("RGB") for p in eval_pngs[:2]]

    def logits(image=None):
        with torch.no_grad():
            if image is None:
                return model(**text).logits
            return model(**with_image(processor.image_token + "\nWhat color is it?", [image])).logits

    def with_image(texts, images):  # one <image> tag token each (the processor itself would expand it to 4)
        return {**tok(texts, return_tensors="pt", padding=True),
                "pixel_values": processor.image_processor(images=images, return_tensors="pt")["pixel_values"]}

    with torch.no_grad():
        assert torch.equal(logits(), llm(**text).logits)
    assert torch.equal(logits(images[0]), logits(images[1]))  # closed gate: the image cannot matter
    fusion.blocks[0].attn_gate.data.fill_(1.0)
    assert not torch.allclose(logits(images[0]), logits(images[1]))
    assert torch.equal(logits(), llm(**text).logits)  # no image: the attention adds nothing
    # Two rows, one without an image: each row reads only its own images.
    batch = with_image([processor.image_token + "\nWhat color is it?", "What is 3 plus 4? It is"], [images[0]])
    with torch.no_grad():
        both = model(**batch).logits
    assert torch.allclose(both[0, :8], logits(images[0])[0], atol=1e-5)
    fusion.blocks[1].ff_gate.data.fill_(0.5)
    assert not torch.allclose(logits(), llm(**text).logits)  # the feed-forward acts on text-only rows too


def test_absent_object_questions_ask_about_what_the_scene_lacks(tmp_path):
    import random

    from course_lib.world.scenes import SHAPES, absent_questions, random_scene, write_question_set

    rng = random.Random(0)
    for _ in range(50):
        scene = random_scene(rng)
        names = {o.name for o in scene.objects} | {o.shape for o in scene.objects} | {
            f"{o.color} object" for o in scene.objects}
        for _, question, answer in absent_questions(scene, rng):
            missing = answer.removeprefix("there is no ")
            assert answer.startswith("there is no ") and missing not in names and missing in question
        assert sum(q[0] == "color" for q in absent_questions(scene, rng)) == sum(
            s not in {o.shape for o in scene.objects} for s in SHAPES)
    path = write_question_set(tmp_path / "a", 20, seed=3, absent=True)
    again = write_question_set(tmp_path / "b", 20, seed=3, absent=True)
    records = json.loads(path.read_text())
    assert records == json.loads(again.read_text()) and len(records) == 20
    assert all(r["answer"].startswith("there is no") and (path.parent / "images" / r["image"]).is_file()
               for r in records)
