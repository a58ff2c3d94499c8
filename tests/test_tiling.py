"""Dynamic tiling: grid choices against cases worked out by hand, tiles, token counts."""

import pytest
from PIL import Image

from course_lib.data.tiling import candidate_grids, choose_grid, tile_image, tiled_token_count


def test_candidate_grids():
    assert candidate_grids(4) == [(1, 1), (1, 2), (2, 1), (1, 3), (3, 1), (1, 4), (2, 2), (4, 1)]
    assert len(candidate_grids(12)) == 35  # sum over n <= 12 of the divisors of n
    with pytest.raises(ValueError, match="min_tiles <= max_tiles"):
        candidate_grids(2, 3)


@pytest.mark.parametrize("size, max_tiles, grid", [
    # 800 x 1300: aspect 0.615. Grids of <= 12 tiles: 2x3 = 0.667 (off by 0.051) beats 1x2 = 0.5 (0.115)
    # and 3x4 = 0.75 (0.135); 3x5 = 0.6 would be closer but has 15 tiles.
    ((800, 1300), 12, (2, 3)),
    # 1920 x 1080: aspect 1.778. 2x1 and 4x2 tie at 2.0 (0.222, better than 3x2 = 1.5); the image has
    # 2.07 MP > half of 4x2 tiles of 448 px (0.80 MP), so the grid with more tiles wins.
    ((1920, 1080), 12, (4, 2)),
    # 448 x 448: 1x1 fits exactly; 2x2 ties but 0.20 MP < half of four tiles (0.40 MP): stays 1x1.
    ((448, 448), 12, (1, 1)),
    # 1000 x 1000: ties at 1.0 with 1x1, 2x2, 3x3; 1.0 MP > half of 9 tiles (0.90 MP): 3x3.
    ((1000, 1000), 12, (3, 3)),
    # A long strip 3000 x 300 (aspect 10): 10x1 matches exactly within 12 tiles; with at most 6, 6x1.
    ((3000, 300), 12, (10, 1)),
    ((3000, 300), 6, (6, 1)),
])
def test_grid_choice_by_hand(size, max_tiles, grid):
    assert choose_grid(*size, tile_size=448, max_tiles=max_tiles) == grid


def test_tiles_and_tokens():
    image = Image.new("RGB", (800, 1300), (10, 20, 30))
    image.paste((200, 0, 0), (0, 0, 400, 433))  # the top-left sixth is red
    tiles = tile_image(image, tile_size=448, max_tiles=12)
    assert len(tiles) == 2 * 3 + 1 and all(t.size == (448, 448) for t in tiles)
    assert tiles[0].getpixel((10, 10)) == (200, 0, 0) and tiles[1].getpixel((400, 400)) == (10, 20, 30)
    # InternVL 1.5: 256 tokens per 448 px tile after pixel shuffle; CLIP-L/336 tiles: 576.
    assert tiled_token_count(800, 1300, 448, 12, tokens_per_tile=256) == 7 * 256
    assert tiled_token_count(448, 448, 448, 12, tokens_per_tile=256) == 256  # one tile: no thumbnail
    assert len(tile_image(image, 448, 12, thumbnail=False)) == 6
    with pytest.raises(ValueError, match="at least 1 pixel"):
        choose_grid(0, 10, 448, 12)


def test_placeholders_and_samples_expand_per_image():
    from course_lib.data.records import Sample
    from course_lib.data.tiling import expand_placeholders, tiled_sample

    assert expand_placeholders("<image>\n<image>\nWhich?", [3, 1]) == "<image><image><image>\n<image>\nWhich?"
    with pytest.raises(ValueError, match="2 <image> placeholders for 1 images"):
        expand_placeholders("<image><image>", [1])
    sample = Sample("s", ("a.png", "b.png"), ({"role": "user", "content": "<image>\nfirst"},
                                               {"role": "assistant", "content": "ok"},
                                               {"role": "user", "content": "<image>\nsecond"}))
    tiled = tiled_sample(sample, (3, 1))
    assert tiled.images == ("a.png", "a.png", "a.png", "b.png")
    assert [m["content"] for m in tiled.messages] == ["<image><image><image>\nfirst", "ok", "<image>\nsecond"]


@pytest.fixture(scope="module")
def wide_data(tmp_path_factory):
    """16 samples with 128 x 64 images (two scenes side by side): 2x1 tiles + a thumbnail at 64 px."""
    import json
    import random

    from course_lib.world.scenes import questions, random_scene, render

    out = tmp_path_factory.mktemp("wide")
    (out / "images").mkdir()
    rng, records = random.Random(0), []
    for i in range(16):
        left, right = random_scene(rng), random_scene(rng)
        image = Image.new("RGB", (128, 64))
        image.paste(render(left, 64, rng), (0, 0))
        image.paste(render(right, 64, rng), (64, 0))
        image.save(out / "images" / f"w{i}.png")
        _, q, a = questions(left, rng)[0]
        records.append({"id": f"w{i}", "image": f"w{i}.png", "conversations": [
            {"from": "human", "value": f"<image>\nIn the left half: {q}"}, {"from": "gpt", "value": a}]})
    (out / "wide.json").write_text(json.dumps(records))
    return out


@pytest.mark.training  # two train.run stages
def test_tiling_end_to_end_dataset_training_and_chat(tiny_world, empty_llava, wide_data, tmp_path):
    """--image_tiling trains, is saved with the model, and chat tiles the image the same way."""
    from course_lib import train
    from course_lib.chat import Chat
    from course_lib.data.dataset import LlavaDataset
    from course_lib.data.image_tokens import image_token_count
    from course_lib.serving.generation import prepare_inputs, user_message
    from course_lib.serving.loading import load_trained

    folder, _, processor = empty_llava
    data = LlavaDataset(wide_data / "wide.json", processor, template="chat", image_tiling=4)
    item = data[0]
    image_id, n = processor.tokenizer.convert_tokens_to_ids("<image>"), image_token_count(processor)
    assert item["pixel_values"].shape == (3, 3, 64, 64)  # 2 tiles + thumbnail
    assert (item["input_ids"] == image_id).sum() == 3 * n
    untiled = LlavaDataset(wide_data / "wide.json", processor, template="chat")[0]
    assert (untiled["input_ids"] == image_id).sum() == n and untiled["pixel_values"].shape[0] == 1

    fast = ["--data_path", str(wide_data / "wide.json"), "--image_tiling", "4", "--max_steps", "2",
            "--per_device_train_batch_size", "4", "--report_to", "none", "--seed", "0"]
    train.run(["--stage", "pretrain", "--model_name_or_path", str(folder), "--output_dir", str(tmp_path / "s1"), *fast])
    out = tmp_path / "tiled"
    train.run(["--stage", "finetune", "--train_type", "freeze_vision", "--model_name_or_path", str(tmp_path / "s1"),
               "--output_dir", str(out), *fast])
    loaded = load_trained(out)
    assert loaded.preprocessing == {"pad_to_square": False, "image_tiling": 4}
    wide = Image.open(wide_data / "images" / "w0.png")
    inputs = prepare_inputs(loaded.processor, [[user_message("What is on the left?", 1)]], [[wide]],
                            loaded.device, loaded.dtype, **loaded.preprocessing)
    assert inputs["pixel_values"].shape[0] == 3 and (inputs["input_ids"] == image_id).sum() == 3 * n
    reply = Chat(loaded).ask("What is on the left?", images=[wide])
    assert reply and reply == Chat(loaded).ask("What is on the left?", images=[wide])  # greedy: deterministic
