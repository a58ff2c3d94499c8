"""Dynamic-resolution tiling (LLaVA-1.5-HD, LLaVA-NeXT, InternVL 1.5): a big image as several tiles.

A vision tower sees a fixed square (336 px for CLIP-L/336, 448 px for InternViT). Downscaling a large or
long image to that square loses detail; tiling keeps it:

1. choose the grid (cols x rows, at most `max_tiles` tiles) whose aspect ratio is closest to the image's;
   on a tie the grid with more tiles wins if the image has more than half the pixels those tiles hold
   (InternVL's `find_closest_aspect_ratio`, which also sorts the grids by tile count);
2. resize the image to (cols * tile, rows * tile) and cut it into tiles, row by row;
3. add a thumbnail (the whole image at one tile's size) when there is more than one tile, for the global view;
4. the image then costs (tiles + thumbnail) x tokens per tile: each tile is one "image" to the model.

Reference: InternVL's `dynamic_preprocess` / `find_closest_aspect_ratio` (https://github.com/OpenGVLab/InternVL,
internvl_chat/internvl/train/dataset.py). InternVL 1.5 uses 448 px tiles, up to 12 of them, and pixel
shuffle (`projectors.pixel_shuffle`) to bring each tile from 1024 patches to 256 tokens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from PIL import Image

from course_lib.data.records import IMAGE_TOKEN

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from transformers import ProcessorMixin

    from course_lib.data.records import Sample


def candidate_grids(max_tiles: int, min_tiles: int = 1) -> list[tuple[int, int]]:
    """Every (cols, rows) with min_tiles <= cols * rows <= max_tiles, fewest tiles first."""
    if not 1 <= min_tiles <= max_tiles:
        raise ValueError(f"need 1 <= min_tiles <= max_tiles, got {min_tiles} and {max_tiles}")
    grids = {(c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles + 1)
             if min_tiles <= c * r <= max_tiles}
    return sorted(grids, key=lambda g: (g[0] * g[1], g))


def choose_grid(width: int, height: int, tile_size: int, max_tiles: int, min_tiles: int = 1) -> tuple[int, int]:
    """The (cols, rows) grid for a `width` x `height` image (see the module docstring for the rule)."""
    if width < 1 or height < 1:
        raise ValueError(f"image size {width}x{height}: both sides must be at least 1 pixel")
    aspect = width / height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in candidate_grids(max_tiles, min_tiles):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and width * height > 0.5 * tile_size * tile_size * cols * rows:
            best = (cols, rows)
    return best


def tile_image(image: Image.Image, tile_size: int, max_tiles: int, min_tiles: int = 1,
               thumbnail: bool = True) -> list[Image.Image]:
    """The tiles, row by row, then the thumbnail (only when there is more than one tile)."""
    cols, rows = choose_grid(image.width, image.height, tile_size, max_tiles, min_tiles)
    resized = image.resize((cols * tile_size, rows * tile_size), Image.Resampling.BICUBIC)
    tiles = [resized.crop((c * tile_size, r * tile_size, (c + 1) * tile_size, (r + 1) * tile_size))
             for r in range(rows) for c in range(cols)]
    if thumbnail and len(tiles) > 1:
        tiles.append(image.resize((tile_size, tile_size), Image.Resampling.BICUBIC))
    return tiles


def tiled_token_count(width: int, height: int, tile_size: int, max_tiles: int, tokens_per_tile: int,
                      thumbnail: bool = True) -> int:
    """Image tokens the LLM reads for one image: (tiles + thumbnail) x tokens per tile."""
    cols, rows = choose_grid(width, height, tile_size, max_tiles)
    tiles = cols * rows
    return (tiles + (1 if thumbnail and tiles > 1 else 0)) * tokens_per_tile


def plot_tiling(image: Image.Image, tile_size: int, max_tiles: int, title: str | None = None) -> Figure:
    """The image with its grid drawn over it, and the tiles + thumbnail the model will see."""
    import matplotlib.pyplot as plt

    cols, rows = choose_grid(image.width, image.height, tile_size, max_tiles)
    tiles = tile_image(image, tile_size, max_tiles)
    fig = plt.figure(figsize=(10, 4))
    grid = fig.add_gridspec(rows, 2 * cols + 2)  # the image, a gap, the tiles, the thumbnail
    ax = fig.add_subplot(grid[:, :cols])
    ax.imshow(image.resize((cols * tile_size, rows * tile_size)))
    for c in range(1, cols):
        ax.axvline(c * tile_size - 0.5, color="red", linewidth=2)
    for r in range(1, rows):
        ax.axhline(r * tile_size - 0.5, color="red", linewidth=2)
    ax.set_title(title or f"{image.width}x{image.height} -> {cols}x{rows} grid of {tile_size} px", fontsize=9)
    ax.axis("off")
    for k, tile in enumerate(tiles):
        r, c = (k // cols, k % cols) if k < cols * rows else (0, cols)
        sub = fig.add_subplot(grid[r, cols + 1 + c])
        sub.imshow(tile)
        sub.set_title("thumbnail" if k == cols * rows else f"tile {k}", fontsize=7)
        sub.axis("off")
    return fig


def tile_images(images: list[Image.Image], tile_size: int, max_tiles: int) -> tuple[list[Image.Image], list[int]]:
    """All tiles of all images in order, and how many each image became (1 when `max_tiles` is 0: off)."""
    if max_tiles <= 0:
        return list(images), [1] * len(images)
    groups = [tile_image(image, tile_size, max_tiles) for image in images]
    return [tile for group in groups for tile in group], [len(group) for group in groups]


def prepare_images(images: list[Image.Image], processor: ProcessorMixin, pad_to_square: bool = False,
                   image_tiling: int = 0) -> tuple[list[Image.Image], list[int]]:
    """What the vision tower sees, in training (LlavaDataset) and in chat alike: each image padded to a
    square if asked (LLaVA-1.5's `pad`), then tiled; returns the images and how many each became."""
    from course_lib.data.image_tokens import image_size
    from course_lib.data.images import expand2square, mean_colour

    if pad_to_square:
        colour = mean_colour(processor.image_processor)
        images = [expand2square(image, colour) for image in images]
    return tile_images(list(images), image_size(processor)[0], image_tiling)


def tile_count(width: int, height: int, tile_size: int, max_tiles: int) -> int:
    """How many images (tiles + thumbnail) one image becomes; 1 when tiling is off."""
    if max_tiles <= 0:
        return 1
    cols, rows = choose_grid(width, height, tile_size, max_tiles)
    return cols * rows + (1 if cols * rows > 1 else 0)


def expand_placeholders(text: str, counts: list[int], placeholder: str = IMAGE_TOKEN) -> str:
    """Replace the k-th `placeholder` with counts[k] copies: each tile is an image to the model."""
    parts = text.split(placeholder)
    if len(parts) - 1 != len(counts):
        raise ValueError(f"{len(parts) - 1} {placeholder} placeholders for {len(counts)} images")
    return parts[0] + "".join(placeholder * n + rest for n, rest in zip(counts, parts[1:]))


def tiled_sample(sample: Sample, counts: tuple[int, ...]) -> Sample:
    """The sample with its k-th `<image>` repeated counts[k] times and each image path repeated alike."""
    from dataclasses import replace


    messages, k = [], 0
    for message in sample.messages:
        n = message["content"].count(IMAGE_TOKEN)
        messages.append({**message, "content": expand_placeholders(message["content"], list(counts[k:k + n]))})
        k += n
    images = tuple(path for path, n in zip(sample.images, counts) for _ in range(n))
    return replace(sample, messages=tuple(messages), images=images)
