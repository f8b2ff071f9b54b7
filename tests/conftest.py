import torch

from latentforge.model_sampling import DiscreteFlow

# The tests use tiny tensors: one thread avoids thread-pool overhead and contention on 2-core CI.
torch.set_num_threads(1)


class FlowModel:
    """The exact denoiser of a Gaussian mixture `g` (latentforge.gmm) in rectified-flow coordinates
    x = (1 − σ)x₀ + σε, shift 1. `reshape_dim`: apply it to x viewed as [-1, reshape_dim] (image-shaped x)."""

    model_sampling = DiscreteFlow(shift=1.0)

    def __init__(self, g, reshape_dim: int | None = None):
        self.D, self.dim = g.denoiser(flow=True), reshape_dim

    def __call__(self, x, sigma, **kw):
        if self.dim is None:
            return self.D(x, sigma)
        return self.D(x.reshape(-1, self.dim), sigma).reshape(x.shape)


class Counter:
    """Counts the denoiser calls (NFEs) of `model`, passing model_sampling through."""

    def __init__(self, model):
        self.model, self.calls = model, 0
        self.model_sampling = getattr(model, "model_sampling", None)

    def __call__(self, x, sigma, **kw):
        self.calls += 1
        return self.model(x, sigma, **kw)
