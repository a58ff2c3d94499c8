"""Templates and labels: which tokens carry loss, image token expansion, truncation that keeps images whole."""

import copy
import dataclasses
import json
from itertools import groupby

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers import CLIPImageProcessor, LlavaProcessor

from course_lib.data.image_tokens import image_token_count
from course_lib.data.labels import IGNORE_INDEX, PromptEncoder, labelled_spans
from course_lib.data.records import DataError, to_sample


@pytest.fixture(scope="module")
def chat(processor):
    return PromptEncoder(processor, "chat")


@pytest.fixture(scope="module")
def instruct(tiny_world):
    records = json.loads((tiny_world.data / "instruct" / "instruct.json").read_text())
    return [to_sample(r, i) for i, r in enumerate(records)]


def _pick(samples, kind):
    tests = {
        "multi_turn": lambda s: len(s.messages) > 2,
        "two_images": lambda s: len(s.images) == 2,
        "text_only": lambda s: not s.images,
    }
    return next(s for s in samples if tests[kind](s))


def _runs(labels):
    """(start, end) of each run of labels that carry loss."""
    runs, start = [], None
    for k, y in enumerate([*labels, IGNORE_INDEX]):
        if y != IGNORE_INDEX and start is None:
            start = k
        elif y == IGNORE_INDEX and start is not None:
            runs.append((start, k))
            start = None
    return runs


@pytest.mark.parametrize("kind", ["multi_turn", "two_images", "text_only"])
def test_chat_template_labels_exactly_the_answers(chat, instruct, processor, kind):
    sample = _pick(instruct, kind)
    encoded = chat.encode(sample)
    chat.check(encoded)  # the shared masking check
    tok = processor.tokenizer
    answers = [m["content"] + "<|im_end|>" for m in sample.messages if m["role"] == "assistant"]
    assert labelled_spans(encoded.labels, tok) == answers
    header = tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    for start, end in _runs(encoded.labels):
        assert encoded.input_ids[start - len(header):start] == header  # the header is there, without loss
        assert tok.decode(encoded.input_ids[end:end + 1]) == "\n"  # the "\n" after <|im_end|>: no loss
        assert encoded.input_ids[end - 1] == tok.convert_tokens_to_ids("<|im_end|>")
    image_positions = [k for k, t in enumerate(encoded.input_ids) if t == chat.image_token_id]
    assert len(image_positions) == image_token_count(processor) * len(sample.images)
    assert all(encoded.labels[k] == IGNORE_INDEX for k in image_positions)
    assert encoded.labels.count(IGNORE_INDEX) + sum(e - s for s, e in _runs(encoded.labels)) == len(encoded.labels)


def test_check_passes_on_the_whole_tiny_instruct_set(chat, instruct):
    for sample in instruct[:400]:
        chat.check(chat.encode(sample))


def test_plain_template_is_image_tokens_caption_eos(processor, tiny_world):
    record = json.loads((tiny_world.data / "pretrain" / "chat.json").read_text())[0]
    plain = PromptEncoder(processor, "plain")
    encoded = plain.encode(to_sample(record, 0))
    plain.check(encoded)
    caption = record["conversations"][1]["value"]
    n = image_token_count(processor)
    assert encoded.input_ids[:n] == [plain.image_token_id] * n
    assert encoded.labels[:n] == [IGNORE_INDEX] * n
    assert encoded.labels[n:] == encoded.input_ids[n:]  # the instruction text of the human turn is dropped
    assert processor.tokenizer.decode(encoded.input_ids[n:]) == caption + processor.tokenizer.eos_token


def test_plain_template_refuses_multi_turn(processor, instruct):
    with pytest.raises(DataError, match="plain template takes one caption exchange") as err:
        PromptEncoder(processor, "plain").encode(_pick(instruct, "multi_turn"))
    assert err.value.reason == "plain_needs_one_exchange"


@pytest.mark.parametrize("change", ["newline_gets_loss", "im_end_loses_loss", "image_gets_loss", "label_swapped"])
def test_masking_check_catches_wrong_labels(chat, instruct, change):
    encoded = chat.encode(_pick(instruct, "multi_turn"))
    labels = list(encoded.labels)
    start, end = _runs(labels)[0]
    if change == "newline_gets_loss":
        labels[end] = encoded.input_ids[end]
    elif change == "im_end_loses_loss":
        labels[end - 1] = IGNORE_INDEX
    elif change == "image_gets_loss":
        k = encoded.input_ids.index(chat.image_token_id)
        labels[k] = chat.image_token_id
    else:
        labels[start] = encoded.input_ids[start] + 1
    with pytest.raises(DataError) as err:
        chat.check(dataclasses.replace(encoded, labels=labels))
    assert err.value.reason == "label_mismatch"


def _clip_processor(tokenizer, size: int, patch: int, strategy: str = "default"):
    image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch,
                          vision_feature_select_strategy=strategy, num_additional_image_tokens=1)


@pytest.mark.parametrize(("size", "patch", "strategy", "expected"),
                         [(336, 14, "default", 576), (336, 14, "full", 577), (224, 32, "default", 49),
                          (64, 16, "default", 16)])
def test_image_token_count_matches_the_processor_for_any_clip(processor, size, patch, strategy, expected):
    real = _clip_processor(processor.tokenizer, size, patch, strategy)
    assert image_token_count(real) == expected
    inputs = real(images=[Image.new("RGB", (40, 30))], text="<image>\nhi", return_tensors="pt")
    assert (inputs["input_ids"] == real.image_token_id).sum().item() == expected  # the processor's own expansion
    assert PromptEncoder(real, "chat").tokens("<image>\nhi").count(real.image_token_id) == expected


words = st.lists(st.sampled_from(["red", "circle", "left", "two", "?", "the", " ", "\n"]), min_size=1, max_size=12)


@st.composite
def conversations(draw):
    """A random sample: 1-3 exchanges, 0-2 images per user turn, placeholders anywhere in the turn."""
    messages, n_images = [], 0
    for _ in range(draw(st.integers(1, 3))):
        parts = ["".join(draw(words))]
        for _ in range(draw(st.integers(0, 2))):
            parts.insert(draw(st.integers(0, len(parts))), "<image>")
            n_images += 1
        messages += [{"from": "human", "value": "q " + "".join(parts)},
                     {"from": "gpt", "value": "a " + "".join(draw(words))}]
    return {"id": "x", "image": [f"{k}.png" for k in range(n_images)], "conversations": messages}


@settings(max_examples=120, deadline=None)
@given(record=conversations(), per_image=st.sampled_from([1, 3, 16, 576]), template=st.sampled_from(["chat", "plain"]),
       data=st.data())
def test_truncation_never_cuts_an_image(processor, record, per_image, template, data):
    if template == "plain":
        record["conversations"] = record["conversations"][:2]
        record["image"] = record["image"][:record["conversations"][0]["value"].count("<image>")]
    encoder = copy.copy(PromptEncoder(processor, template))
    encoder.tokens_per_image = per_image  # any CLIP geometry
    full = encoder.encode(to_sample(record, 0))
    image = encoder.image_token_id
    inside = [k + 1 for k, t in enumerate(full.input_ids) if t == image and k > 0]
    if inside and data.draw(st.booleans()):  # the interesting caps: the cut falls inside an image's tokens
        cap = data.draw(st.sampled_from(inside))
    else:
        cap = data.draw(st.integers(2, len(full.input_ids) + 10))
    cut = encoder.truncate(full, cap)
    if cut is None:  # dropped: no answer token fits before the first image that would be cut
        n_before = sum(t == image for t in full.input_ids[:cap])
        first_loss = next(k for k, y in enumerate(full.labels) if k and y != IGNORE_INDEX)
        assert first_loss >= cap - n_before % per_image
        return
    assert len(cut.input_ids) <= cap and len(cut.input_ids) == len(cut.labels)
    assert cut.input_ids == full.input_ids[:len(cut.input_ids)] and cut.labels == full.labels[:len(cut.labels)]
    assert cut.input_ids.count(image) == cut.n_images * per_image and cut.n_images <= full.n_images
    runs = [len(list(group)) for t, group in groupby(cut.input_ids) if t == image]
    assert all(n % per_image == 0 for n in runs), runs  # every run of image tokens is whole images
    assert any(y != IGNORE_INDEX for y in cut.labels[1:])
    assert cut.truncated == (len(full.input_ids) > cap)


def test_nfd_text_is_not_a_label_mismatch_for_a_normalising_tokenizer(processor):
    """Qwen2.5's tokenizer normalises to NFC: an NFD answer decodes composed, and that is still the answer."""
    from tokenizers import normalizers

    nfc = copy.deepcopy(processor)
    nfc.tokenizer.backend_tokenizer.normalizer = normalizers.NFC()
    answer = "cafe\u0301 au lait"  # NFD: e + combining acute accent
    record = {"id": "nfd", "conversations": [{"from": "human", "value": "What is it?"},
                                             {"from": "gpt", "value": answer}]}
    encoder = PromptEncoder(nfc, template="chat")
    encoded = encoder.encode(to_sample(record, 0))
    assert "\u00e9" in labelled_spans(encoded.labels, nfc.tokenizer)[0]  # decoded composed
    encoder.check(encoded)  # no label_mismatch
