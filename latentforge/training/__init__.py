"""Training: data, objectives (noise levels, targets, loss weighting) and exactly resumable state."""
