"""Text: the tokenizer (tiktoken / tokenizer.json), Llama 4's chat format, and small-BPE training."""

from .chat import ChatEncoding, MediaSlot, encode_dialog
from .tokenizer import Tokenizer

__all__ = ["ChatEncoding", "MediaSlot", "Tokenizer", "encode_dialog"]
