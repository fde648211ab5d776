"""llama4: Meta's Llama 4 model family in plain, readable PyTorch."""

from .config import (Llama4Config, TextConfig, VisionConfig, config_from_hf, config_to_hf, kv_cache_bytes,
                     load_config, parameter_counts, preset, save_config)
from .media import load_image, preprocess_image
from .tokenizer import Tokenizer
from .video import load_video

__all__ = ["Llama4Config", "TextConfig", "VisionConfig", "config_from_hf", "config_to_hf", "kv_cache_bytes",
           "load_config", "parameter_counts", "preset", "save_config", "Tokenizer",
           "load_image", "preprocess_image", "load_video"]
__version__ = "0.1.0"

from .checkpoint import load, save  # noqa: E402
from .model import Llama4  # noqa: E402

__all__ += ["Llama4", "load", "save"]

from .generate import generate, generate_batch, generate_stream  # noqa: E402

__all__ += ["generate", "generate_batch", "generate_stream"]
