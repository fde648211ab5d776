"""Media: image tiling, video frame sampling, and chat messages -> prompt ids + tiles."""

from .image import load_image, preprocess_image
from .prompt import Prompt, encode_prompt, user_message
from .video import load_video

__all__ = ["Prompt", "encode_prompt", "load_image", "load_video", "preprocess_image", "user_message"]
