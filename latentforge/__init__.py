"""latentforge: a latent diffusion engine — networks, samplers, schedules, training and generation."""

__version__ = "0.1.0"


def __getattr__(name):  # `latentforge.Pipeline` without importing torch models at package import
    if name == "Pipeline":
        from latentforge.pipeline import Pipeline

        return Pipeline
    raise AttributeError(f"module 'latentforge' has no attribute {name!r}")
