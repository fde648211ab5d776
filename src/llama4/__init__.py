"""llama4: Meta's Llama 4 model family in plain, readable PyTorch."""

from .config import (Llama4Config, TextConfig, VisionConfig, config_from_hf, config_to_hf, kv_cache_bytes,
                     load_config, parameter_counts, preset, save_config)
from .tokenizer import Tokenizer

__all__ = ["Llama4Config", "TextConfig", "VisionConfig", "config_from_hf", "config_to_hf", "kv_cache_bytes",
           "load_config", "parameter_counts", "preset", "save_config", "Tokenizer"]
__version__ = "0.1.0"

from .checkpoint import load, save  # noqa: E402
from .model import Llama4  # noqa: E402

__all__ += ["Llama4", "load", "save"]
