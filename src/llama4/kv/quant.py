"""KV tensors stored in one byte per element: fp8 (e4m3) or int8, with a scale per (position, kv head).

The KV dtype is separate from the weights' dtype: `kv_dtype="fp8"|"int8"` keeps the global layers'
keys and values (the part that grows with the context) in one byte per element, so they take about
half of what bf16 takes. Every key or value vector of one head at one position ([Dh] elements) gets
its own scale, `absmax / qmax`, rounded to bf16 *before* quantizing (so the stored scale is exact and
the only error is the element rounding). Per-(position, head) scales never need requantizing when
a sequence grows, forks, rolls back or is written through a paged block table: a scale lives in the
same slot as its vector, and is indexed by the same leading indices.

Bytes per element: 1 + 2 / Dh (the bf16 scale), so the ratio to bf16 is 0.5 + 1 / Dh: 0.508 at
Llama 4's head_dim 128.

`KVTensor` is what the stores hold: `put(idx, x)` quantizes on write, `get(idx)` returns the slots
dequantized to the compute dtype, `copy(dst, src)` moves stored bytes and scales without a round
trip. A plain (unquantized) KVTensor is the old buffer, read and written as is.

Shape legend: `...` leading slot indices (rows / blocks, kv heads, slots), Dh head dim.
"""

from __future__ import annotations

import torch

KV_DTYPES = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}
_QMAX = {"fp8": 448.0, "int8": 127.0}
SCALE_DTYPE = torch.bfloat16
# bf16's smallest normal number: an all-zero vector gets this scale (and quantizes to zeros).
_TINY = 2.0 ** -126


def check_kv_dtype(kv_dtype: str | None) -> str | None:
    """None / "auto" (the weights' dtype) -> None; "fp8" / "int8" -> itself; anything else: ValueError."""
    if kv_dtype is None or kv_dtype == "auto":
        return None
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"kv_dtype={kv_dtype!r} is not supported: expected one of {sorted(KV_DTYPES)} or None/'auto' "
                         f"(keys and values in the weights' dtype)")
    return kv_dtype


def quantize(x_ND: torch.Tensor, kv_dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_ND in the storage dtype, scale_N in bf16) with x ~= q * scale; N is any leading shape."""
    qmax = _QMAX[kv_dtype]
    xf_ND = x_ND.float()
    scale_N = (xf_ND.abs().amax(-1) / qmax).clamp_min(_TINY).to(SCALE_DTYPE)
    y_ND = (xf_ND / scale_N.float().unsqueeze(-1)).clamp(-qmax, qmax)
    if kv_dtype == "int8":
        y_ND = y_ND.round()
    return y_ND.to(KV_DTYPES[kv_dtype]), scale_N


def dequantize(q_ND: torch.Tensor, scale_N: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q_ND.float() * scale_N.float().unsqueeze(-1)).to(dtype)


class KVTensor:
    """A KV buffer of `shape` (last dim Dh), stored in `dtype`, or in `kv_dtype` with scales."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, kv_dtype: str | None = None,
                 device: torch.device | str = "cpu"):
        self.kv_dtype, self.dtype = check_kv_dtype(kv_dtype), dtype
        store = KV_DTYPES[self.kv_dtype] if self.kv_dtype else dtype
        self.data = torch.zeros(*shape, dtype=store, device=device)
        self.scale = torch.ones(*shape[:-1], dtype=SCALE_DTYPE, device=device) if self.kv_dtype else None

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    def put(self, idx, x: torch.Tensor) -> None:
        """Write `x` (compute dtype) into `data[idx]`; `idx` indexes leading dims only, never Dh."""
        if self.scale is None:
            self.data[idx] = x
        else:
            q, s = quantize(x, self.kv_dtype)
            self.data[idx], self.scale[idx] = q, s

    def get(self, idx=slice(None)) -> torch.Tensor:
        """`data[idx]` in the compute dtype."""
        if self.scale is None:
            return self.data[idx]
        return dequantize(self.data[idx], self.scale[idx], self.dtype)

    def index_select(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows of dim 0, in the compute dtype."""
        if self.scale is None:
            return self.data.index_select(0, rows)
        return dequantize(self.data.index_select(0, rows), self.scale.index_select(0, rows), self.dtype)

    def copy(self, dst, src) -> None:
        """Stored bytes (and scales) of `src` into `dst`: no requantization."""
        self.data[dst] = self.data[src]
        if self.scale is not None:
            self.scale[dst] = self.scale[src]

    def nbytes(self) -> int:
        n = self.data.numel() * self.data.element_size()
        return n + (self.scale.numel() * self.scale.element_size() if self.scale is not None else 0)


def bytes_per_element(head_dim: int, dtype: torch.dtype, kv_dtype: str | None) -> float:
    """Stored bytes per cached element, scales included."""
    if check_kv_dtype(kv_dtype) is None:
        return torch.empty(0, dtype=dtype).element_size()
    return 1 + torch.empty(0, dtype=SCALE_DTYPE).element_size() / head_dim
