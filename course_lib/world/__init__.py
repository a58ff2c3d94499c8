"""The tiny world: its synthetic scenes, its small CLIP and Qwen2-shaped LM, and a broken data set."""

from course_lib.world.backbones import TinyWorld, TinyWorldConfig, ensure_tiny_world

__all__ = ["TinyWorld", "TinyWorldConfig", "ensure_tiny_world"]
