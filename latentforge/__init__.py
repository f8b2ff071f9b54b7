"""latentforge: a latent diffusion engine — networks, samplers, schedules, training and generation."""

__version__ = "0.1.0"
