"""KV stores: what attention writes keys and values into and reads them back from."""

from .contiguous import LayerCache, cache_rows, keep_rows, make_cache

__all__ = ["LayerCache", "cache_rows", "keep_rows", "make_cache"]
