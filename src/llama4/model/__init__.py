from .cache import LayerCache, make_cache
from .moe import MoE, moe_dense_reference
from .transformer import Llama4

__all__ = ["Llama4", "LayerCache", "MoE", "make_cache", "moe_dense_reference"]
