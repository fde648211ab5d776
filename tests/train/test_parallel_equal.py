"""gloo CPU processes against one process: forward and backward of a parallelized model (FSDP2, FSDP+EP,
TP) equal the plain model's in fp32, and the balancing statistics summed over ranks equal one
process's."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from llama4.config import preset
from llama4.train.distributed import spawn

pytestmark = pytest.mark.usefixtures("one_thread")  # from conftest

V = 512


def tiny_config():
    cfg = preset("tiny").replace(num_hidden_layers=2, vocab_size=V)
    cfg.vision = None
    return cfg


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _equal_worker(plans: list[dict]) -> list[dict]:
    """For each plan: max relative error of this rank's logits, the loss, and every gradient against
    the same model run whole on the whole batch in this process."""
    import torch.distributed as dist

    from llama4.model import Llama4
    from llama4.train.parallel import build_mesh, make_plan, parallelize

    cfg = tiny_config()
    ids_BT = torch.randint(0, V, (4, 24), generator=torch.Generator().manual_seed(1))
    ref = Llama4(cfg).init_weights(seed=0)
    logits_ref = ref(ids_BT[:, :-1])
    n_targets = ids_BT[:, 1:].numel()
    loss_ref = F.cross_entropy(logits_ref.flatten(0, 1), ids_BT[:, 1:].flatten(), reduction="sum") / n_targets
    loss_ref.backward()
    grads_ref = {k: p.grad for k, p in ref.named_parameters()}

    def rel(a, b):
        return float((a - b).abs().max() / b.abs().max().clamp(min=1e-6))

    out = []
    for kw in plans:
        model = copy.deepcopy(ref)
        model.zero_grad()
        plan = make_plan(dist.get_world_size(), cfg.text, **kw)
        mesh = build_mesh(plan, "cpu")
        parallelize(model, mesh, plan)
        share = ids_BT.shape[0] // plan.dp
        lo = mesh["dp"].get_local_rank() * share
        mine_BT = ids_BT[lo:lo + share]
        logits = _full(model(mine_BT[:, :-1]))
        loss = F.cross_entropy(logits.flatten(0, 1), mine_BT[:, 1:].flatten(), reduction="sum") / n_targets
        loss.backward()
        total = loss.detach().clone()
        dist.all_reduce(total, group=mesh["dp"].get_group())
        errs = {"logits": rel(logits.detach(), logits_ref[lo:lo + share].detach()),
                "loss": rel(total, loss_ref.detach())}
        for k, p in model.named_parameters():
            assert p.grad is not None, f"{kw}: no gradient for {k}"
            errs[k] = rel(_full(p.grad), grads_ref[k])
        out.append(errs)
    return out


PLANS_2 = [{"dp_shard": 2}, {"ep": 2}, {"tp": 2}]


def _two_rank_worker() -> tuple:
    return _equal_worker(PLANS_2), _balance_worker(5)


@pytest.fixture(scope="module")
def two_ranks():
    """Both checks in one pair of processes (starting them is most of the cost)."""
    return spawn(_two_rank_worker, 2)


def test_fsdp_ep_tp_forward_backward_equal_one_process(two_ranks):
    for rank_errs, _ in two_ranks:
        for kw, errs in zip(PLANS_2, rank_errs):
            bad = {k: v for k, v in errs.items() if not v < 1e-5}
            assert not bad, (kw, bad)


@pytest.mark.slow
def test_four_rank_layouts_forward_backward_equal_one_process():
    plans = [{"tp": 2, "ep": 2}, {"dp_replicate": 2, "ep": 2}, {"dp_shard": 4, "ep": 4}]
    for rank_errs in spawn(_equal_worker, 4, plans):
        for kw, errs in zip(plans, rank_errs):
            bad = {k: v for k, v in errs.items() if not v < 1e-5}
            assert not bad, (kw, bad)


# Balancing statistics over ranks -----------------------------------------------------------------------
def _balance_worker(split: int) -> dict:
    """Rank 0 holds the first `split` tokens (one of them padding), rank 1 the rest: the summed
    auxiliary loss, its summed router gradient and the bias step equal one process on all tokens."""
    import torch.distributed as dist

    from llama4.model.moe import MoE
    from llama4.train.balance import ExpertBalancer, aux_loss

    text = tiny_config().text
    torch.manual_seed(0)
    moe = MoE(text)
    moe.init_weights(0.5)
    x_ND = torch.randn(12, text.hidden_size, generator=torch.Generator().manual_seed(2))
    mask_N = torch.ones(12, dtype=torch.bool)
    mask_N[3] = False
    ref = copy.deepcopy(moe)
    one = aux_loss(ref.router(x_ND), ref, mask_N)
    one.backward()
    part = slice(0, split) if dist.get_rank() == 0 else slice(split, None)
    mine = aux_loss(moe.router(x_ND[part]), moe, mask_N[part], distributed=True)
    mine.backward()
    value, grad = mine.detach().clone(), moe.router.weight.grad.clone()
    dist.all_reduce(value)
    dist.all_reduce(grad)

    # The bias step: counts summed over the ranks move every bias as one process's counts do.
    class Holder(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.Module()])
            self.layers[0].feed_forward = m

    biases = []
    for j, (m, x, mask) in enumerate(((copy.deepcopy(ref), x_ND, mask_N), (copy.deepcopy(moe), x_ND[part], mask_N[part]))):
        bal = ExpertBalancer(Holder(m), bias_update_rate=0.1, aux_loss_coef=0.0)
        m.train()
        bal.begin()
        m(x[None], mask[None])
        bal.collect()
        if j == 0:  # the reference: all tokens in this process, nothing to sum
            c_E = bal.counts_LE[0]
            m.expert_bias += 0.1 * torch.sign(c_E.mean() - c_E).to(m.expert_bias)
        else:
            c_E = bal.counts_LE[0]  # this rank's alone: a bias step from them would differ
            alone = m.expert_bias + 0.1 * torch.sign(c_E.mean() - c_E).to(m.expert_bias)
            bal.step()  # sums this rank's counts with the other rank's
        biases.append(m.expert_bias.clone())
    return {"aux": float((value - one).abs() / one.abs()),
            "grad": float((grad - ref.router.weight.grad).abs().max() / ref.router.weight.grad.abs().max()),
            "bias": float((biases[0] - biases[1]).abs().max()), "moved": float(biases[0].abs().sum()),
            "alone": float((alone - biases[0]).abs().max())}


def test_balancing_sums_over_ranks_equal_one_process(two_ranks):
    for _, r in two_ranks:
        assert r["aux"] < 1e-5 and r["grad"] < 1e-5, r
        assert r["bias"] == 0.0 and r["moved"] > 0, r
    assert max(r["alone"] for _, r in two_ranks) > 0  # the sum mattered: one rank's counts alone differ
