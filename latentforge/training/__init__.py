"""Training: objectives (noise-level sampling, prediction targets, loss weighting) for latent diffusion."""
