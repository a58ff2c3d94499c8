"""Training: arguments, run recipes, trainable parts, checkpoints, the launcher."""
