"""The pictures of notebooks 02/03: every one renders and saves, and the token pictures are checked on what
they draw (each cell's text and colour, read back from the figure), not on the size of a PNG."""

import matplotlib.pyplot as plt
import pytest
from matplotlib.figure import Figure
from PIL import Image

from course_lib.data.dataset import LlavaDataset
from course_lib.data.image_tokens import image_token_count
from course_lib.lessons import plots


@pytest.fixture(scope="module")
def item(tiny_world, empty_llava):
    """A one-image eval sample (one question, one answer), with its messages."""
    ds = LlavaDataset(tiny_world.data / "eval" / "eval.json", empty_llava[2], template="chat")
    k = next(k for k in range(len(ds)) if ds.image_counts[k] == 1 and len(ds.samples[k].messages) == 2)
    return {**ds[k], "messages": ds.samples[k].messages}


def test_every_figure_saves_to_png(item, empty_llava, tiny_world, tmp_path):
    _, model, processor = empty_llava
    image_id = model.config.image_token_index
    image = Image.open(next((tiny_world.data / "eval" / "images").glob("*.png")))
    figures = {
        "image_to_tokens": plots.plot_image_to_tokens(image, processor),
        "image_to_tokens_wide": plots.plot_image_to_tokens(image.resize((96, 60)), processor, max_tokens=4),
        "prompt_tokens": plots.plot_prompt_tokens(item["input_ids"], processor.tokenizer, image_id),
        "prompt_tokens_collapsed": plots.plot_prompt_tokens(item["input_ids"], processor.tokenizer, image_id,
                                                            max_image_tokens=4),
        "label_mask": plots.plot_label_mask(item["input_ids"], item["labels"], processor.tokenizer, image_id),
        "attention_masks": plots.plot_attention_masks([7, 4, 5]),
        "masked_scatter": plots.plot_masked_scatter(model, item["input_ids"], item["pixel_values"]),
    }
    for name, fig in figures.items():
        assert isinstance(fig, Figure), name
        path = tmp_path / f"{name}.png"
        fig.savefig(path)
        plt.close(fig)
        assert Image.open(path).format == "PNG", name


def test_token_cells_shorten_long_image_runs(item, empty_llava):
    processor = empty_llava[2]
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    ids = item["input_ids"].tolist()
    kinds = ["text"] * len(ids)
    n = image_token_count(processor)  # one image's run, shown as 2 cells: "<image>", "… xN"
    cells = plots._token_cells(ids, processor.tokenizer, image_id, kinds, max_image_tokens=2)
    assert n > 2 and len(cells) == len(ids) - n + 2 and (f"… x{n}", "text") in cells
    assert len(plots._token_cells(ids, processor.tokenizer, image_id, kinds, max_image_tokens=n)) == len(ids)


def _drawn_cells(fig) -> list[tuple[str, str]]:
    """(text, kind) of each token cell as drawn: the cell's text and the kind its rectangle's colour means."""
    from matplotlib.colors import to_hex

    ax = fig.axes[0]
    kind_of = {to_hex(colour): kind for kind, colour in plots.TOKEN_COLOURS.items()}
    kinds = [kind_of[to_hex(patch.get_facecolor())] for patch in ax.patches]
    texts = [t.get_text() for t in ax.texts]
    assert len(texts) == len(kinds)
    return list(zip(texts, kinds, strict=True))


def _joined(cells, kind) -> str:
    return "".join(text for text, k in cells if k == kind).replace("·", " ").replace("\\n", "\n")


def test_prompt_tokens_figure_draws_image_special_and_text_tokens(item, empty_llava):
    _, model, processor = empty_llava
    tokenizer, image_id = processor.tokenizer, model.config.image_token_index
    ids = item["input_ids"].tolist()
    n = image_token_count(processor)
    question = item["messages"][0]["content"].replace("<image>", "").strip()
    chatml = {tokenizer.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>")}

    fig = plots.plot_prompt_tokens(item["input_ids"], tokenizer, image_id, max_image_tokens=2)
    cells = _drawn_cells(fig)
    plt.close(fig)
    assert fig.axes[0].get_title() == f"{len(ids)} tokens, {n} of them image tokens"
    # The image's n tokens are drawn as 2 image-coloured cells, where the image sits in the prompt.
    start = ids.index(image_id)
    assert n > 2 and len(cells) == len(ids) - n + 2
    assert [k for k, (_, kind) in enumerate(cells) if kind == "image"] == [start, start + 1]
    assert cells[start:start + 2] == [("<image>", "image"), (f"… x{n}", "image")]
    # ChatML's markers are the special cells; the question reads word by word in the text cells.
    assert [text for text, kind in cells if kind == "special"] == [
        tokenizer.convert_ids_to_tokens(t) for t in ids if t in chatml]
    assert question in _joined(cells, "text") and "<image>" not in _joined(cells, "text")

    fig = plots.plot_prompt_tokens(item["input_ids"], tokenizer, image_id)  # default: a short run is drawn whole
    cells = _drawn_cells(fig)
    plt.close(fig)
    assert len(cells) == len(ids) and cells[start:start + n] == [("<image>", "image")] * n
    assert sum(kind == "image" for _, kind in cells) == n


def test_label_mask_figure_marks_the_answer_as_labelled_and_the_prompt_as_masked(item, empty_llava):
    _, model, processor = empty_llava
    tokenizer, image_id = processor.tokenizer, model.config.image_token_index
    ids, labels = item["input_ids"].tolist(), item["labels"].tolist()
    n = image_token_count(processor)
    question = item["messages"][0]["content"].replace("<image>", "").strip()
    answer = item["messages"][1]["content"]

    fig = plots.plot_label_mask(item["input_ids"], item["labels"], tokenizer, image_id)
    cells = _drawn_cells(fig)
    plt.close(fig)
    n_loss = sum(y != -100 for y in labels)
    assert fig.axes[0].get_title() == f"labels: {n_loss} of {len(ids)} tokens carry loss"
    assert [kind for _, kind in cells] == ["ignored" if y == -100 else "loss" for y in labels]
    # Labelled: the assistant's answer and the <|im_end|> that ends it; the system prompt, the question
    # and the image are masked.
    assert _joined(cells, "loss") == answer + "<|im_end|>"
    assert question in _joined(cells, "ignored")
    assert [kind for text, kind in cells if text == "<image>"] == ["ignored"] * n

    fig = plots.plot_label_mask(item["input_ids"], item["labels"], tokenizer, image_id, max_image_tokens=2)
    cells = _drawn_cells(fig)
    plt.close(fig)
    start = ids.index(image_id)
    assert len(cells) == len(ids) - n + 2 and cells[start:start + 2] == [("<image>", "ignored"), (f"… x{n}", "ignored")]
    assert _joined(cells, "loss") == answer + "<|im_end|>"


def test_attention_mask_panels_draw_the_three_masks():
    import numpy as np

    fig = plots.plot_attention_masks([7, 4, 5])
    causal, padded, packed = (np.asarray(ax.images[0].get_array(), dtype=bool) for ax in fig.axes)
    plt.close(fig)
    assert (causal == np.tril(np.ones((7, 7), dtype=bool))).all()
    assert not padded[:, 4:].any() and (padded[:4, :4] == np.tril(np.ones((4, 4), dtype=bool))).all()
    expected = np.zeros((16, 16), dtype=bool)
    for start, end in ((0, 7), (7, 11), (11, 16)):
        expected[start:end, start:end] = np.tril(np.ones((end - start, end - start), dtype=bool))
    assert (packed == expected).all()
