"""Training state that survives wrapping and sharding: counts and bias on the modules, padding kept out
of the expert load, the loss through the head module, checkpointing applied from outside; plus the
config type check."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import llama4
from llama4.checkpoint.hf import parse_size
from llama4.train.balance import ExpertBalancer, aux_loss
from llama4.train.config import type_error
from llama4.train.loop import checkpoint_layers
from llama4.train.loss import chunked_cross_entropy
from test_train_parts import tiny_text_config


def test_loss_calls_the_head_module():
    """A sharded head's hooks (FSDP all-gather) must fire: the loss calls the module, chunk by chunk."""
    head = torch.nn.Linear(16, 50, bias=False)
    calls = []
    head.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    h = torch.randn(37, 16, requires_grad=True)
    y = torch.randint(0, 50, (37,))
    loss = chunked_cross_entropy(h, head, y, chunk=16)
    assert calls == [16, 16, 5]
    loss.backward()
    assert calls[3:] == [16, 16]  # each chunk but the last recomputed in backward
    gw = head.weight.grad.clone()
    head.weight.grad = None
    F.cross_entropy(head(h), y).backward()
    torch.testing.assert_close(gw, head.weight.grad)


def test_checkpointing_wraps_blocks_from_outside():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    model = llama4.Llama4(tiny_text_config(layers=2)).init_weights(std=0.05, seed=0)
    keys = list(model.state_dict())
    ids = torch.randint(0, 300, (1, 12))
    ref = model(ids)
    checkpoint_layers(model)
    assert all(isinstance(b, CheckpointWrapper) and "forward" not in vars(b) for b in model.layers)
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(model(ids), ref)


def test_balancer_counts_valid_tokens_once_and_masks_the_aux_loss():
    model = llama4.Llama4(tiny_text_config(layers=2)).init_weights(std=0.05, seed=0).train()
    bal = ExpertBalancer(model, bias_update_rate=0.1, aux_loss_coef=0.01)
    ids = torch.randint(0, 300, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 5:] = False
    bal.begin()
    model(ids, token_mask=mask)
    aux = bal.collect()
    model(ids, token_mask=mask)  # e.g. an activation-checkpoint recompute: not counted
    k = bal.moes[0].top_k
    assert bal.counts_LE.sum(-1).tolist() == [float(17 * k)] * len(bal.moes)
    assert aux is not None and aux.requires_grad
    # The masked aux loss is the aux loss of the valid tokens alone.
    logits_NE = torch.randn(24, bal.moes[0].n_experts)
    torch.testing.assert_close(aux_loss(logits_NE, bal.moes[0], mask.reshape(-1)),
                               aux_loss(logits_NE[mask.reshape(-1)], bal.moes[0]))
    load = bal.step()
    assert all(abs(sum(row) - 1) < 1e-9 for row in load)
    assert all((m.tokens_per_expert == 0).all() for m in bal.moes)


@pytest.mark.parametrize("text, expected", [("5GB", 5 * 10**9), ("5GiB", 5 * 2**30), ("500MB", 500 * 10**6),
                                            ("1.5MiB", int(1.5 * 2**20)), ("100KB", 100_000), (123, 123)])
def test_shard_sizes(text, expected):
    assert parse_size(text) == expected


def test_shard_size_errors():
    with pytest.raises(ValueError, match="max_shard_size='5 apples'"):
        parse_size("5 apples")
    with pytest.raises(ValueError, match="max_shard_size='5iB'"):
        parse_size("5iB")


@pytest.mark.parametrize("value, annotation, ok", [
    (3, "int | None", True), (None, "int | None", True), ("3", "int | None", False), (True, "int | None", False),
    ([1, 2], "list[int]", True), ([1, "2"], "list[int]", False), ([0.9, 1], "list[float]", True),
    ("auto", "str | bool", True), (False, "str | bool", True), (2, "float", True), ({}, "dict", True),
    ([["a"]], "list[list[str]]", True), (None, "list[int] | None", True), ([None], "list[int] | None", False),
])
def test_type_table_reads_annotations(value, annotation, ok):
    assert (type_error(value, annotation) is None) == ok


def test_type_error_names_what_was_expected():
    assert type_error("x", "list[int] | None") == "expected list of int or null"
    with pytest.raises(TypeError, match="'tuple\\[int\\]' is not one the type check knows"):
        type_error((1,), "tuple[int]")
