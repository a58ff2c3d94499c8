"""The LLaVA model's parts: chat template, projectors, LoRA targets, partial LoRA, parameter tables."""
