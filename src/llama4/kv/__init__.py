"""KV stores: what attention writes keys and values into and reads them back from (see `base.py`)."""

from .base import KVStore, PrefillGroup, Step
from .contiguous import ContiguousKV, make_cache

__all__ = ["ContiguousKV", "KVStore", "PrefillGroup", "Step", "make_cache"]
