"""The expert-kernel seam: which kernel runs, every kernel equals the loop and the dense reference, and
the small-row path never syncs with the host."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from llama4.model.experts import KERNELS, SMALL_ROWS, Kernel, register_kernel, select_kernel
from llama4.model.moe import moe_dense_reference
from test_moe import make_moe


def _rows(moe, x_BTD):
    """The sorted rows and counts the MoE hands its experts."""
    seen = {}
    orig = moe.experts.forward

    def spy(x_RD, counts_E):
        seen["x"], seen["counts"] = x_RD, counts_E
        return orig(x_RD, counts_E)

    moe.experts.forward = spy
    moe(x_BTD)
    moe.experts.forward = orig
    return seen["x"], seen["counts"]


def test_kernel_choice():
    experts = make_moe().experts
    assert select_kernel(experts, torch.randn(SMALL_ROWS, 32)).name == "gather"
    assert select_kernel(experts, torch.randn(SMALL_ROWS + 1, 32)).name == "loop"  # CPU: no grouped_mm
    experts.kernel = "grouped_mm"
    assert select_kernel(experts, torch.randn(100, 32)).name == "grouped_mm"
    experts.kernel = "nope"
    with pytest.raises(ValueError, match="experts.kernel='nope': no such kernel .* registered: \\['grouped_mm'"):
        select_kernel(experts, torch.randn(4, 32))


def test_compiling_takes_the_sync_free_kernel(monkeypatch):
    experts = make_moe().experts
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert select_kernel(experts, torch.randn(4096, 32)).name == "gather"


@pytest.mark.parametrize("k, T", [(1, 3), (2, 3), (2, 40), (3, 7)])
def test_every_kernel_equals_loop_and_dense(k, T):
    """E = 16 with few tokens leaves most experts empty; top-2 and top-3 route a token to several."""
    moe = make_moe(E=16, k=k)
    moe.expert_bias[3] = -100.0  # expert 3 (in the middle) never chosen
    x = torch.randn(1, T, 32)
    rows_RD, counts_E = _rows(moe, x)
    assert counts_E[3] == 0
    outs = {}
    for name in ("loop", "gather"):
        moe.experts.kernel = name
        outs[name] = moe.experts(rows_RD, counts_E)
        torch.testing.assert_close(moe(x), moe_dense_reference(moe, x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs["gather"], outs["loop"], rtol=1e-5, atol=1e-5)


def test_grouped_mm_kernel_on_this_device():
    """torch._grouped_mm has a CPU fallback: the offsets, empty experts and layout handling of our
    kernel are checked here; the CUDA kernel itself is not (no GPU)."""
    moe = make_moe(E=16, k=2, dtype=torch.bfloat16)
    x = torch.randn(1, 5, 32, dtype=torch.bfloat16)
    rows_RD, counts_E = _rows(moe, x)
    moe.experts.kernel = "loop"
    ref = moe.experts(rows_RD, counts_E).float()
    moe.experts.kernel = "grouped_mm"
    torch.testing.assert_close(moe.experts(rows_RD, counts_E).float(), ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(moe(x).float(), moe_dense_reference(moe, x).float(), rtol=3e-2, atol=3e-2)


def test_gather_kernel_gradients_match_loop():
    moe = make_moe(E=8, k=2)
    x = torch.randn(1, 3, 32)
    grads = {}
    for name in ("loop", "gather"):
        moe.zero_grad()
        moe.experts.kernel = name
        moe(x).square().sum().backward()
        grads[name] = [p.grad.clone() for p in moe.experts.parameters()]
    for a, b in zip(grads["loop"], grads["gather"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


class NoHostSync(TorchDispatchMode):
    """Fails on the ops that copy a value to the host or size their output from the data."""
    BANNED = {"_local_scalar_dense", "nonzero", "bincount", "unique", "_unique2", "masked_select", "item"}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.BANNED or (name == "repeat_interleave" and not (kwargs or {}).get("output_size")):
            raise AssertionError(f"host sync: aten.{name}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("B, T, k", [(1, 1, 1), (4, 1, 1), (2, 2, 2)])
def test_small_moe_forward_never_syncs(B, T, k, monkeypatch):
    """What the compiled decode step relies on: N*k <= SMALL_ROWS rows route, dispatch, run and combine
    without a host sync (nor a Python read of a tensor's values)."""
    moe = make_moe(E=16, k=k).eval()
    moe.expert_bias.copy_(torch.linspace(-0.1, 0.1, 16))
    x = torch.randn(B, T, 32)
    ref = moe_dense_reference(moe, x)

    def boom(*a, **kw):
        raise AssertionError("host read of a tensor")

    for attr in ("tolist", "item", "__bool__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, attr, boom)
    with NoHostSync():
        out = moe(x)
    monkeypatch.undo()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_small_moe_compiles_fullgraph():
    moe = make_moe(E=16, k=2).eval()
    x = torch.randn(2, 1, 32)
    compiled = torch.compile(moe, fullgraph=True, backend="eager")  # tracing is what breaks on a sync
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), moe_dense_reference(moe, x), rtol=1e-5, atol=1e-5)


def test_autocast_feeds_kernels_the_autocast_dtype():
    """fp32 weights under bf16 autocast: the kernels see bf16 rows (grouped_mm needs bf16 on both sides)."""
    seen = []
    loop = next(k for k in KERNELS["plain"] if k.name == "loop")
    register_kernel("plain", Kernel("spy", lambda e, x: False, lambda e, x, c: seen.append(x.dtype) or loop.run(e, x, c)))
    try:
        moe = make_moe(E=8)
        moe.experts.kernel = "spy"
        x = torch.randn(1, 20, 32)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = moe(x)
        assert seen == [torch.bfloat16] and moe.experts.gate_up_proj.dtype == torch.float32
        torch.testing.assert_close(out.float(), moe_dense_reference(moe, x), rtol=3e-2, atol=3e-2)
    finally:
        KERNELS["plain"][:] = [k for k in KERNELS["plain"] if k.name != "spy"]


def test_small_loop_is_the_eager_cpu_decode_kernel():
    experts = make_moe().experts
    x = torch.randn(SMALL_ROWS, 32)
    with torch.no_grad():
        assert select_kernel(experts, x).name == "small_loop"
        assert select_kernel(experts, torch.randn(SMALL_ROWS + 1, 32)).name == "loop"
    # With autograd through the weights it steps aside (w[e] would make E-sized zero gradients)
    assert select_kernel(experts, x).name == "gather"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k, T", [(1, 1), (2, 1), (1, 5), (2, 4)])
def test_small_loop_equals_loop(dtype, k, T):
    moe = make_moe(E=16, k=k, dtype=dtype)
    moe.expert_bias[5] = -100.0
    x = torch.randn(1, T, 32, dtype=dtype)
    with torch.no_grad():
        rows_RD, counts_E = _rows(moe, x)
        assert counts_E[5] == 0 and rows_RD.shape[0] == k * T <= SMALL_ROWS
        moe.experts.kernel = "loop"
        ref = moe.experts(rows_RD, counts_E).float()
        moe.experts.kernel = "small_loop"
        got = moe.experts(rows_RD, counts_E).float()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol)
    moe.experts.kernel = "small_loop"
    with torch.no_grad():
        assert moe.experts(rows_RD[:0], torch.zeros(16, dtype=torch.int64)).shape == (0, 32)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_one_token_path_equals_dense_reference(k):
    """Batch-1 decode skips the sort over experts; it must equal the dense formulation and the
    general (sorted) path."""
    moe = make_moe(E=16, k=k).eval()
    x = torch.randn(1, 1, 32)
    sorted_calls = []
    orig = torch.argsort
    try:
        torch.argsort = lambda *a, **kw: sorted_calls.append(1) or orig(*a, **kw)
        with torch.no_grad():
            got = moe(x)
    finally:
        torch.argsort = orig
    assert not sorted_calls
    with torch.no_grad():
        torch.testing.assert_close(got, moe_dense_reference(moe, x), rtol=1e-5, atol=1e-5)
        general = moe(torch.cat([x, torch.randn(1, 1, 32)], 1))[:, :1]
        torch.testing.assert_close(got, general, rtol=1e-5, atol=1e-5)
    xb = x.bfloat16()
    moe_b = moe.to(torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(moe_b(xb).float(), moe_dense_reference(moe_b, xb).float(), rtol=3e-2, atol=3e-2)
