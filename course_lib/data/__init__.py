"""From records to batches: records, images, image tokens, labels, the dataset, collators, tiling, validation."""
