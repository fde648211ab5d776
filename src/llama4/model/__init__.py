from .moe import MoE, moe_dense_reference
from .transformer import Llama4

__all__ = ["Llama4", "MoE", "moe_dense_reference"]
