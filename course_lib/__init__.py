"""course_lib: the support library of the LLaVA course. The map of its rooms: notebooks/README.md."""

__version__ = "0.1.0"


def _prefer_quiet_pil_image_processors() -> None:
    """Without torchvision (CPU machines have no build of it) transformers falls back to its PIL image
    processors and warns once per process; resolve the fallback here, quietly, so learners see no noise."""
    import transformers

    from course_lib.util.quiet import quiet_transformers

    with quiet_transformers():
        transformers.CLIPImageProcessor  # noqa: B018  (the lookup performs the fallback)


_prefer_quiet_pil_image_processors()
