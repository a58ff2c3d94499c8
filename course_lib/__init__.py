"""course_lib: the support library of the LLaVA course (build, data, training, inference, plots)."""

__version__ = "0.1.0"


def _prefer_quiet_pil_image_processors() -> None:
    """Without torchvision (CPU machines have no build of it) transformers falls back to its PIL image
    processors and warns once per process; resolve the fallback here, quietly, so learners see no noise."""
    import transformers
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        transformers.CLIPImageProcessor  # noqa: B018  (the lookup performs the fallback)
    finally:
        logging.set_verbosity(level)


_prefer_quiet_pil_image_processors()
