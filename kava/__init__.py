"""KaVa: latent reasoning via compressed KV-cache distillation."""
from kava.config import ConfigError, KavaConfig

__all__ = ["KavaConfig", "ConfigError"]
__version__ = "0.1.0"
