"""Checkpoints: the HF layout (one declarative key map, safetensors read by hand) and Meta's format."""

from .hf import load, save, state_dict_hf
from .keymap import KeyMap
from .meta import load_meta

__all__ = ["KeyMap", "load", "load_meta", "save", "state_dict_hf"]
