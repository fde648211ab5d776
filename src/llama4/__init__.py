"""llama4: Meta's Llama 4 model family in plain, readable PyTorch."""

from .accounting import kv_cache_bytes, parameter_counts
from . import kv
from .checkpoint import load, save
from .config import Llama4Config, TextConfig, VisionConfig, config_from_hf, config_to_hf, load_config, preset, save_config
from .eval.score import RollingScore, Score, score, score_rolling
from .generation import generate, generate_batch, generate_stream
from .media import load_image, load_video, preprocess_image
from .model import Llama4
from .text import Tokenizer

__all__ = ["Llama4", "Llama4Config", "TextConfig", "Tokenizer", "VisionConfig", "config_from_hf", "config_to_hf",
           "generate", "generate_batch", "generate_stream", "kv", "kv_cache_bytes", "load", "load_config", "load_image",
           "load_video", "parameter_counts", "preset", "preprocess_image", "RollingScore", "save", "save_config", "Score", "score", "score_rolling"]
__version__ = "0.1.0"
