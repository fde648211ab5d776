"""Weight-only quantization: int8 per channel, int4 group-wise, fp8 e4m3 per channel.

A quantized weight is stored the way its kernel wants it and multiplied without materialising the
full-precision matrix where a kernel exists. Every scheme is symmetric (no zero points) and scales
one output row (int4: one group of input columns of one row) by an fp32 scale, the convention of
compressed-tensors, which writes what `llama4 quantize` saves.

Kernels measured on this project's CPU (figures in docs/quantization.md):
- int8: `torch._weight_int8pack_mm` for bf16 activations up to `INT8_KERNEL_MAX_ROWS` rows (it is
  up to 9x faster than a bf16 matmul at one row, slower at many), dequantize + bf16 matmul above.
- int4: `torch._weight_int4pack_mm_for_cpu` on weights packed once by
  `torch._convert_weight_to_int4pack_for_cpu` (needs N % 16 == 0); a nibble layout with dequantize
  + matmul where that packing is impossible or off the CPU.
- fp8: W8A8 with dynamic per-token activation scales (the scheme of the official FP8 checkpoints).
  On CUDA `torch._scaled_mm` (unverified here: no GPU). On CPU no kernel beats dequantize + matmul
  (`torch._scaled_mm` on CPU is slower still): activations are rounded to fp8 per token and the
  weights converted by bit shifts, 3x faster than `.to()`.
fp32 activations go through the bf16 kernels (the int kernels are 10-40x slower with fp32 inputs).

Shape legend: M rows of activations, N output features, K input features, G groups per row (K / g),
E experts, R routed rows, D model dim, F expert hidden.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .experts import Experts, Kernel, register_kernel

SCHEMES = ("int8", "int4", "fp8")
INT4_GROUP_SIZES = (32, 64, 128)
INT8_KERNEL_MAX_ROWS = 32
FP8_MAX = 448.0  # largest finite float8_e4m3fn


@dataclass(frozen=True)
class QuantScheme:
    """`name` is int8 | int4 | fp8; `group_size` applies to int4 only (columns sharing one scale)."""

    name: str
    group_size: int = 128

    def __post_init__(self):
        if self.name not in SCHEMES:
            raise ValueError(f"quantization scheme {self.name!r}: expected one of {', '.join(SCHEMES)}")
        if self.name == "int4" and self.group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"int4 group size {self.group_size}: expected one of {INT4_GROUP_SIZES}")

    @property
    def bits(self) -> int:
        return 4 if self.name == "int4" else 8

    def __str__(self) -> str:
        return f"int4-g{self.group_size}" if self.name == "int4" else self.name


def as_scheme(spec: str | QuantScheme, group_size: int | None = None) -> QuantScheme:
    """A scheme from 'int8', 'fp8', 'int4' (group 128) or 'int4-g64'."""
    if isinstance(spec, QuantScheme):
        return spec
    name, _, g = str(spec).partition("-g")
    if g and not g.isdigit():
        raise ValueError(f"quantization scheme {spec!r}: expected int8, fp8, int4 or int4-g<group size>")
    return QuantScheme(name, int(g) if g else (group_size or 128))


# Quantize / dequantize one [N, K] matrix (the checkpoint form: integer or fp8 values + fp32 scales) ---

def quantize_weight(w_NK: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_NK, scale): int8 q with scale [N, 1]; int4 q (int8 holding -8..7) with scale [N, G];
    fp8 q with scale [N, 1]. Symmetric min-max, as compressed-tensors' observers compute it."""
    w = w_NK.float()
    N, K = w.shape
    if scheme.name == "fp8":
        scale = (w.abs().amax(1, keepdim=True) / FP8_MAX).clamp(min=1e-12)
        return (w / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale
    if scheme.name == "int8":
        scale = (w.abs().amax(1, keepdim=True) / 127.5).clamp(min=1e-12)
        return (w / scale).round().clamp(-128, 127).to(torch.int8), scale
    g = scheme.group_size
    if K % g:
        raise ValueError(f"int4 group size {g} does not divide the input dim {K} of a [{N}, {K}] weight")
    w_NGg = w.reshape(N, K // g, g)
    scale = (w_NGg.abs().amax(-1) / 7.5).clamp(min=1e-12)
    q = (w_NGg / scale[..., None]).round().clamp(-8, 7)
    return q.reshape(N, K).to(torch.int8), scale


def dequantize_weight(q_NK: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The reference: values times scales in fp32 (a [N, G] scale repeats over K / G columns)."""
    N, K = q_NK.shape
    scale = scale.float().reshape(N, -1)
    return (q_NK.float().reshape(N, scale.shape[1], -1) * scale[..., None]).reshape(N, K).to(dtype)


def fp8_to(q: torch.Tensor, scale_N1: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp8 e4m3 -> `dtype`, times the row scales. The fp8 bits shifted into a bf16's place are the
    same value times 2^-120 (subnormals included: both formats' subnormals line up), so one integer
    shift and one multiply replace `.to()`, which is 3x slower on CPU. NaN is not preserved."""
    x = q.view(torch.uint8).to(torch.int16)
    bits = ((x & 0x80) << 8) | ((x & 0x7F) << 4)
    return (bits.view(torch.bfloat16).to(dtype) * (scale_N1.float() * 2.0**120).to(dtype))


def _unpack_nibbles(p: torch.Tensor, K: int) -> torch.Tensor:
    """[..., K/2] uint8 (low nibble = even column) -> [..., K] int8 in -8..7."""
    s = p.view(torch.int8)
    lo, hi = (s << 4) >> 4, s >> 4
    return torch.stack([lo, hi], -1).reshape(*p.shape[:-1], K)


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    return ((q[..., 1::2] << 4) | (q[..., 0::2] & 0xF)).view(torch.uint8)


def int4_cpu_packable(N: int, K: int, group_size: int) -> bool:
    return N % 16 == 0 and K % group_size == 0 and K % 2 == 0


# Stacked quantized matrices: E of them, [E, N, K] each, in their kernel's layout ---------------------

class QuantMatrices(nn.Module):
    """E quantized [N, K] matrices (E = 1 for a linear layer) and `mm(e, x_MK) -> [M, N]`.

    Buffers (persistent, so `state_dict` shows the stored form):
      int8  q [E, N, K] int8,           scale [E, N] fp32
      int4  q [E, N, K/2] uint8 packed, scale_zeros [E, G, N, 2] bf16 (CPU kernel layout, zeros 0)
            or, `layout == "nibble"`:   q [E, N, K/2] uint8 nibbles, scale [E, N, G] fp32
      fp8   q [E, N, K] float8_e4m3fn,  scale [E, N] fp32
    """

    def __init__(self, E: int, N: int, K: int, scheme: QuantScheme, device: torch.device | str | None = None):
        super().__init__()
        self.E, self.N, self.K, self.scheme = E, N, K, scheme
        self.act_scale_ub: float | None = None  # fp8 only: see fp8_per_token
        self._scales_as: dict = {}
        device = torch.device(device or "cpu")
        kw = {"device": device}
        if scheme.name == "int4":
            g = scheme.group_size
            if K % g:
                raise ValueError(f"int4 group size {g} does not divide the input dim {K}")
            cpu_ok = device.type in ("cpu", "meta") and int4_cpu_packable(N, K, g)
            self.layout = "cpu-int4pack" if cpu_ok else "nibble"
            self.register_buffer("q", torch.empty(E, N, K // 2, dtype=torch.uint8, **kw))
            if cpu_ok:
                self.register_buffer("scale_zeros", torch.empty(E, K // g, N, 2, dtype=torch.bfloat16, **kw))
            else:
                self.register_buffer("scale", torch.empty(E, N, K // g, **kw))
        else:
            self.layout = "rows"
            dt = torch.int8 if scheme.name == "int8" else torch.float8_e4m3fn
            self.register_buffer("q", torch.empty(E, N, K, dtype=dt, **kw))
            self.register_buffer("scale", torch.empty(E, N, **kw))

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) must move these buffers but never recast them: fp8 values are
        # floating point to torch, and fp32 scales would lose bits as bf16.
        def keep_dtype(t):
            out = fn(t)
            return out if out.dtype == t.dtype else t.to(out.device)
        self._scales_as = {}
        return super()._apply(keep_dtype, recurse)

    def _scale_as(self, e: int, dtype: torch.dtype) -> torch.Tensor:
        """Row scales of matrix e in `dtype`, converted once (a per-call cast is a visible share of a
        decode step's time)."""
        key = (e, dtype)
        if key not in self._scales_as:
            self._scales_as[key] = self.scale[e].to(dtype)
        return self._scales_as[key]

    @torch.no_grad()
    def set(self, e: int, q_NK: torch.Tensor, scale: torch.Tensor) -> None:
        """Store matrix `e` from its checkpoint form (`quantize_weight`'s output)."""
        self._scales_as = {}
        if tuple(q_NK.shape) != (self.N, self.K):
            raise ValueError(f"quantized weight of shape {list(q_NK.shape)}; expected [{self.N}, {self.K}]")
        if self.scheme.name == "int4":
            q8 = q_NK.to(torch.int8)
            s_NG = scale.float().reshape(self.N, -1)
            if self.layout == "cpu-int4pack":
                # The kernel's unsigned nibble u = q + 8 with zero 0 gives (u - 8) * scale = q * scale.
                u = (q8.to(torch.int32) + 8).cpu()
                self.q[e].copy_(torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, 1))
                sz = torch.stack([s_NG.t(), torch.zeros_like(s_NG.t())], -1)
                self.scale_zeros[e].copy_(sz)
            else:
                self.q[e].copy_(_pack_nibbles(q8))
                self.scale[e].copy_(s_NG)
        else:
            self.q[e].copy_(q_NK)
            self.scale[e].copy_(scale.float().reshape(self.N))

    @torch.no_grad()
    def set_float(self, e: int, w_NK: torch.Tensor) -> None:
        self.set(e, *quantize_weight(w_NK, self.scheme))

    def dequantize(self, e: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Matrix `e` as [N, K] in `dtype`."""
        if self.scheme.name == "fp8":
            return fp8_to(self.q[e], self.scale[e][:, None], dtype)
        if self.scheme.name == "int8":
            return self.q[e].to(dtype) * self._scale_as(e, dtype)[:, None]
        if self.layout == "cpu-int4pack":
            # No unpacking routine for the kernel's layout: multiply the identity instead (tests only).
            eye = torch.eye(self.K, dtype=torch.bfloat16, device=self.q.device)
            return self._int4_kernel(e, eye).t().to(dtype)
        return dequantize_weight(_unpack_nibbles(self.q[e], self.K), self.scale[e], dtype)

    def _int4_kernel(self, e: int, x_MK: torch.Tensor) -> torch.Tensor:
        return torch._weight_int4pack_mm_for_cpu(x_MK, self.q[e], self.scheme.group_size, self.scale_zeros[e])

    def mm(self, e: int, x_MK: torch.Tensor) -> torch.Tensor:
        """x @ W_e^T, [M, N] in x's dtype."""
        dt = x_MK.dtype
        name = self.scheme.name
        if name == "int8" and x_MK.device.type == "cpu":
            if x_MK.shape[0] <= INT8_KERNEL_MAX_ROWS:
                xb = x_MK.to(torch.bfloat16)
                return torch._weight_int8pack_mm(xb, self.q[e], self._scale_as(e, torch.bfloat16)).to(dt)
            return x_MK @ self.dequantize(e, torch.bfloat16 if dt == torch.bfloat16 else dt).t()
        if name == "int4" and self.layout == "cpu-int4pack":
            if x_MK.device.type != "cpu":
                raise ValueError("int4 weights were packed for the CPU kernel; quantize again on the target device")
            return self._int4_kernel(e, x_MK.to(torch.bfloat16).contiguous()).to(dt)
        if name == "fp8":
            if x_MK.is_cuda and torch.cuda.get_device_capability(x_MK.device) >= (8, 9):
                return _fp8_scaled_mm(x_MK, self.q[e], self.scale[e], self.act_scale_ub)
            # The same W8A8 arithmetic as the CUDA kernel and the checkpoint's declared scheme:
            # activations rounded to fp8 per token, then a matmul of the dequantized operands.
            xq, x_scale_M1 = fp8_per_token(x_MK, self.act_scale_ub)
            return (xq.to(dt) * x_scale_M1.to(dt)) @ self.dequantize(e, dt).t()
        return x_MK @ self.dequantize(e, dt).t()

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())


def fp8_per_token(x_MK: torch.Tensor, scale_ub: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token fp8 activations: (x_q [M, K] fp8, scale [M, 1] fp32). `scale_ub` caps a
    row's absolute max before scaling (fbgemm's activation_scale_ub: 1200 in Meta's recipe)."""
    amax = x_MK.abs().amax(-1, keepdim=True).float()
    if scale_ub is not None:
        amax = amax.clamp(max=scale_ub)
    x_scale_M1 = (amax / FP8_MAX).clamp(min=1e-12)
    return (x_MK.float() / x_scale_M1).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), x_scale_M1


def _fp8_scaled_mm(x_MK: torch.Tensor, q_NK: torch.Tensor, scale_N: torch.Tensor,
                   scale_ub: float | None) -> torch.Tensor:
    """W8A8 on CUDA: per-token dynamic activation scales, per-channel weight scales (unverified here)."""
    xq, x_scale_M1 = fp8_per_token(x_MK, scale_ub)
    return torch._scaled_mm(xq, q_NK.t(), scale_a=x_scale_M1, scale_b=scale_N.float()[None, :].contiguous(),
                            out_dtype=x_MK.dtype)


# Modules --------------------------------------------------------------------------------------------

class QuantExperts(Experts):
    """Routed experts with quantized weights, behind the expert-kernel seam (`Experts.forward` picks
    the kernel registered for `weight_format` = the scheme's name; the interface stays
    `experts(x_RD, counts_E)`).

    gate_up holds E matrices [2F, D] (gate rows, then up rows, the HF fused layout transposed) and
    down E matrices [D, F]. Only experts that received rows are read, once per routed group.
    """

    def __init__(self, n_experts: int, dim: int, hidden: int, scheme: QuantScheme,
                 device: torch.device | str | None = None):
        nn.Module.__init__(self)  # not Experts.__init__: no float weights
        self.scheme = scheme
        self.weight_format = scheme.name
        self.kernel: str | None = None
        self.gate_up = QuantMatrices(n_experts, 2 * hidden, dim, scheme, device)
        self.down = QuantMatrices(n_experts, dim, hidden, scheme, device)

    def init_weights(self, std: float, generator: torch.Generator | None = None) -> None:
        raise ValueError("quantized experts are made from trained weights (QuantExperts.from_float), not initialised")

    @classmethod
    @torch.no_grad()
    def from_float(cls, gate_up_EDF2: torch.Tensor, down_EFD: torch.Tensor, scheme: QuantScheme) -> "QuantExperts":
        """From the fused HF layout: gate_up [E, D, 2F], down [E, F, D]."""
        E, D, F2 = gate_up_EDF2.shape
        out = cls(E, D, F2 // 2, scheme, gate_up_EDF2.device)
        for e in range(E):
            out.gate_up.set_float(e, gate_up_EDF2[e].t())
            out.down.set_float(e, down_EFD[e].t())
        return out



def _quant_loop_run(experts: QuantExperts, x_RD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """Per expert that has rows: the quantized gate_up and down kernels (`QuantMatrices.mm`)."""
    sizes = counts_E.tolist()
    used = [e for e, n in enumerate(sizes) if n]
    if not used:
        return x_RD.new_empty(x_RD.shape[0], experts.down.N)
    x_per_expert = x_RD.split(sizes)
    h_RF2 = torch.cat([experts.gate_up.mm(e, x_per_expert[e]) for e in used])
    gate, up = h_RF2.chunk(2, dim=-1)
    a_per_expert = (F.silu(gate) * up).split([sizes[e] for e in used])
    return torch.cat([experts.down.mm(e, a) for a, e in zip(a_per_expert, used)])


for _name in SCHEMES:
    register_kernel(_name, Kernel("quant_loop", lambda experts, x_RD: True, _quant_loop_run))


class QuantLinear(nn.Module):
    """A bias-free nn.Linear with a quantized weight [out, in]."""

    def __init__(self, in_features: int, out_features: int, scheme: QuantScheme,
                 device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        self.w = QuantMatrices(1, out_features, in_features, scheme, device)

    @classmethod
    @torch.no_grad()
    def from_float(cls, linear: nn.Linear, scheme: QuantScheme) -> "QuantLinear":
        out = cls(linear.in_features, linear.out_features, scheme, linear.weight.device)
        out.w.set_float(0, linear.weight)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w.mm(0, x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], self.out_features)


# bf16 weights packed for the CPU's fast kernel ------------------------------------------------------
#
# On this project's CPU (AMD EPYC, AVX2, no AVX-512) a bf16 matmul is the slowest way to multiply:
# oneDNN refuses bf16 without avx512bw/vl/dq or avx_ne_convert ("mkldnn_reorder_linear_weight: bf16
# path needs the cpu support ..."), so torch falls back to a scalar kernel: at one row 2x the time of
# fp32 although it reads half the bytes, and x @ w with the HF experts' [D, 2F] layout 30x. fbgemm's
# fp16 GEMM (AVX2 + F16C) multiplies fp32 activations by weights packed once as fp16, 2 bytes a
# weight like bf16: at one row it is 2x faster than fp32 and 4x faster than bf16, and faster than fp32
# at every row count (docs/quantization.md). bf16 -> fp16 is exact for |w| in [2^-14, 65504] (fp16 has
# more mantissa bits); smaller weights become fp16 subnormals (absolute error <= 2^-25); a weight
# above 65504 is refused. Inference only: the packed matrix is opaque, has no gradient and no
# state_dict form (save the model before packing).

FP16_MAX = 65504.0


def _fbgemm_pack(w_NK: torch.Tensor) -> torch.Tensor:
    if w_NK.device.type != "cpu":
        raise ValueError(f"pack_for_cpu: weight on {w_NK.device}; the packed fp16 kernel (fbgemm) is CPU only")
    amax = float(w_NK.detach().abs().max()) if w_NK.numel() else 0.0
    if not amax <= FP16_MAX:  # NaN too
        raise ValueError(f"pack_for_cpu: a weight of magnitude {amax:g} does not fit fp16 (max {FP16_MAX:g}); "
                         f"keep this model unpacked")
    import warnings

    with warnings.catch_warnings():  # torch marks the fbgemm fp16 ops deprecated; they are what runs fast here
        warnings.simplefilter("ignore")
        return torch.ops.aten.fbgemm_pack_gemm_matrix_fp16(w_NK.detach().float().contiguous())


def _fbgemm_mm(x_MK: torch.Tensor, packed, bias_N: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.fbgemm_linear_fp16_weight_fp32_activation(x_MK.float().contiguous(), packed, bias_N)


def cpu_packing_available() -> bool:
    return torch.backends.quantized.supported_engines.count("fbgemm") > 0


class _Packed(nn.Module):
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        raise ValueError(f"{prefix.rstrip('.') or type(self).__name__}: weights packed for CPU inference "
                         f"(pack_for_cpu) have no checkpoint form; save the model before packing it")


class PackedLinear(_Packed):
    """An nn.Linear whose weight is packed as fp16 for fbgemm; output in the input's dtype."""

    def __init__(self, linear: nn.Linear, keep_weight: bool = False):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        if keep_weight:  # the output head: callers read model.output.weight (device, dtype, tied embeddings)
            self.weight = linear.weight
        self.packed = _fbgemm_pack(linear.weight)
        b = linear.bias
        self.bias_f32 = (b.detach().float() if b is not None else torch.zeros(self.out_features)).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _fbgemm_mm(x.reshape(-1, x.shape[-1]), self.packed, self.bias_f32)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


class PackedExperts(_Packed):
    """Routed experts whose weights are packed per expert as fp16 for fbgemm: gate_up as [2F, D] and
    down as [D, F] (the HF layout transposed once, at packing). Behind the expert-kernel seam as
    `weight_format = "cpu-packed"`, same interface `experts(x_RD, counts_E)`."""

    weight_format = "cpu-packed"

    def __init__(self, experts: Experts):
        super().__init__()
        self.kernel: str | None = None
        E, D, F2 = experts.gate_up_proj.shape
        self.n_experts, self.dim, self.hidden = E, D, F2 // 2
        self.gate_up = [_fbgemm_pack(experts.gate_up_proj[e].t()) for e in range(E)]
        self.down = [_fbgemm_pack(experts.down_proj[e].t()) for e in range(E)]
        self._zeros_2F, self._zeros_D = torch.zeros(F2), torch.zeros(D)

    def forward(self, x_RD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        from .experts import compute_dtype, select_kernel

        dt = compute_dtype(x_RD)
        with torch.autocast(x_RD.device.type, enabled=False):
            return select_kernel(self, x_RD).run(self, x_RD, counts_E).to(dt)


def _packed_loop_run(experts: PackedExperts, x_RD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """Per expert that has rows: fbgemm's fp16 GEMM for gate_up, SwiGLU in fp32, then down."""
    sizes = counts_E.tolist()
    outs, start = [], 0
    for e, n in enumerate(sizes):
        if n:
            h = _fbgemm_mm(x_RD[start:start + n], experts.gate_up[e], experts._zeros_2F)
            start += n
            gate, up = h.chunk(2, dim=-1)
            outs.append(_fbgemm_mm(F.silu(gate) * up, experts.down[e], experts._zeros_D))
    if not outs:
        return x_RD.new_empty(x_RD.shape[0], experts.dim)
    return outs[0] if len(outs) == 1 else torch.cat(outs)


register_kernel("cpu-packed", Kernel("packed_loop", lambda experts, x_RD: x_RD.device.type == "cpu", _packed_loop_run))


@torch.no_grad()
def pack_for_cpu(model: nn.Module) -> nn.Module:
    """Pack the text decoder's float weights (attention, shared experts, dense FFNs, routed experts,
    the output head) for CPU inference, in place: fp16 for fbgemm, 2 bytes a weight; the rest of the
    model, activations and KV cache in fp32. Quantized
    modules, the router (its choice is sensitive and it is tiny), embeddings, norms and the vision
    tower stay as they are. The output head keeps its float weight beside the packed copy (callers
    read `model.output.weight`, and a tied head shares it with the embeddings). Returns the model
    (inference only, see above)."""
    from .moe import MoE

    if not cpu_packing_available():
        raise ValueError("pack_for_cpu: this torch build has no fbgemm (torch.backends.quantized.supported_engines)")
    quantized = [n for n, m in model.named_modules() if isinstance(m, (QuantMatrices, QuantExperts, QuantLinear))]
    if quantized:
        raise ValueError(f"pack_for_cpu: {quantized[0]} is quantized; pack a float (bf16 / fp32) model")
    # Everything left unpacked (embeddings, norms, router, vision) and so the activations and the KV
    # cache become fp32: fbgemm multiplies fp32 activations anyway, and on this CPU bf16 attention is
    # 4.6x slower than fp32 at decode (no bf16 GEMM). The weights read per token are the packed fp16.
    model.float()
    targets: dict[str, nn.Module] = {}
    for i, layer in enumerate(model.layers):
        for name, mod in layer.named_modules():
            if isinstance(mod, nn.Linear) and not name.endswith("router"):
                targets[f"layers.{i}.{name}"] = mod
        ff = layer.feed_forward
        if isinstance(ff, MoE) and type(ff.experts) is Experts:
            targets[f"layers.{i}.feed_forward.experts"] = ff.experts
    if isinstance(getattr(model, "output", None), nn.Linear):
        targets["output"] = model.output
    for name, mod in targets.items():
        new = PackedLinear(mod, keep_weight=name == "output") if isinstance(mod, nn.Linear) else PackedExperts(mod)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    model.cpu_packed = True
    return model
