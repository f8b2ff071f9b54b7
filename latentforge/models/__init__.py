"""Networks of the Stable Diffusion family in their original checkpoint layouts.

Each module keeps its own `PRESETS` dict; they are re-exported here under distinct names.
"""

from latentforge.models.controlnet import PRESETS as CONTROLNET_PRESETS
from latentforge.models.controlnet import ControlNet, ControlNetConfig
from latentforge.models.dit import PRESETS as DIT_PRESETS
from latentforge.models.dit import DiT, DiTConfig
from latentforge.models.mmdit import PRESETS as MMDIT_PRESETS
from latentforge.models.mmdit import MMDiT, MMDiTConfig
from latentforge.models.t5 import PRESETS as T5_PRESETS
from latentforge.models.t5 import T5Config, T5Encoder
from latentforge.models.text import PRESETS as TEXT_PRESETS
from latentforge.models.text import CLIPTextConfig, CLIPTextModel, CLIPTextOutput
from latentforge.models.unet import PRESETS as UNET_PRESETS
from latentforge.models.unet import UNet, UNetConfig, sdxl_refiner_vector, sdxl_vector
from latentforge.models.vae import (
    LATENT_FORMATS,
    AutoencoderKL,
    AutoencoderKLConfig,
    DiagonalGaussian,
    LatentFormat,
)
from latentforge.models.vae import PRESETS as VAE_PRESETS

__all__ = [
    "AutoencoderKL", "AutoencoderKLConfig", "CLIPTextConfig", "CLIPTextModel", "CLIPTextOutput",
    "CONTROLNET_PRESETS", "ControlNet", "ControlNetConfig",
    "DIT_PRESETS", "DiT", "DiTConfig", "DiagonalGaussian", "LATENT_FORMATS", "LatentFormat", "MMDIT_PRESETS",
    "MMDiT", "MMDiTConfig", "T5Config", "T5Encoder", "T5_PRESETS", "TEXT_PRESETS", "UNET_PRESETS", "UNet",
    "UNetConfig", "VAE_PRESETS", "sdxl_refiner_vector", "sdxl_vector",
]  # fmt: skip
