"""Every picture of notebooks 02/03 renders: each function returns a Figure that saves as a non-empty PNG."""

import matplotlib.pyplot as plt
import pytest
from matplotlib.figure import Figure
from PIL import Image

from course_lib.data.dataset import LlavaDataset
from course_lib.data.labels import image_token_count
from course_lib.lessons import plots


@pytest.fixture(scope="module")
def item(tiny_world, empty_llava):
    ds = LlavaDataset(tiny_world.data / "eval" / "eval.json", empty_llava[2], template="chat")
    return next(ds[k] for k in range(len(ds)) if ds.image_counts[k] == 1)


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
        assert path.stat().st_size > 5000, name
        assert Image.open(path).size[0] > 300


def test_token_cells_shorten_long_image_runs(item, empty_llava):
    processor = empty_llava[2]
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    ids = item["input_ids"].tolist()
    kinds = ["text"] * len(ids)
    n = image_token_count(processor)  # one image's run, shown as 2 cells: "<image>", "… xN"
    cells = plots._token_cells(ids, processor.tokenizer, image_id, kinds, max_image_tokens=2)
    assert n > 2 and len(cells) == len(ids) - n + 2 and (f"… x{n}", "text") in cells
    assert len(plots._token_cells(ids, processor.tokenizer, image_id, kinds, max_image_tokens=n)) == len(ids)
