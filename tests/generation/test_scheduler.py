"""Continuous batching: outputs equal llama4.generate while requests join and leave, seeded sampling does
not depend on batch mates, preemption under a tiny pool stays correct, cancellation frees blocks."""

from __future__ import annotations

import pytest
import torch

import llama4
from conftest import small_text
from llama4.generation.sampling import SamplingParams
from llama4.generation.scheduler import Request, Scheduler
from llama4.kv.paged import PagedKV

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return llama4.Llama4(small_text()).init_weights(std=0.08, seed=0).eval()


def _ids(n, seed=0):
    return torch.randint(3, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _sched(model, blocks=400, **kw):
    return Scheduler(model, PagedKV(model.config.text, blocks, block_size=8), **kw)


def test_requests_joining_and_leaving_equal_generate(model):
    prompts = [_ids(n, seed=n) for n in (5, 70, 3, 41, 100, 9)]
    lengths = [30, 12, 40, 25, 18, 33]
    ref = [llama4.generate(model, p, max_new_tokens=m, stop_ids=[]) for p, m in zip(prompts, lengths)]
    s = _sched(model, max_running=4, prefill_chunk=16)
    reqs = [Request(p, m) for p, m in zip(prompts, lengths)]
    for r in reqs[:2]:
        s.add(r)
    pending = reqs[2:]
    while s.has_work() or pending:
        if pending and s.steps % 5 == 4:  # join mid-run, while others are decoding or prefilling
            s.add(pending.pop(0))
        s.step()
    assert [r.generated for r in reqs] == ref
    assert all(r.finish_reason == "length" for r in reqs)
    assert s.kv.used_blocks() == 0


def test_seeded_sampling_independent_of_batch(model):
    params = SamplingParams(temperature=1.0, top_p=0.9)
    prompt = _ids(20, seed=1)
    alone = _sched(model).run([Request(prompt, 20, params, seed=123)])[0]
    others = [Request(_ids(n, seed=n), 25, SamplingParams(temperature=0.7), seed=n) for n in (7, 30, 55)]
    s = _sched(model, prefill_chunk=8)
    mine = Request(prompt, 20, params, seed=123)
    out = s.run([others[0], mine, others[1], others[2]])
    assert out[1] == alone
    assert _sched(model).run([Request(prompt, 20, params, seed=124)])[0] != alone


def test_preemption_under_tiny_pool_keeps_outputs(model):
    prompts = [_ids(n, seed=100 + n) for n in (30, 50, 20, 64, 12)]
    ref = [llama4.generate(model, p, max_new_tokens=40, stop_ids=[]) for p in prompts]
    s = _sched(model, blocks=44, max_running=5, prefill_chunk=32)
    assert s.run([Request(p, 40) for p in prompts]) == ref
    assert s.preempted > 0
    assert s.kv.used_blocks() == 0


def test_cancel_frees_blocks_at_next_step(model):
    s = _sched(model)
    events = []
    a = s.add(Request(_ids(40), 100, on_event=events.append))
    b = s.add(Request(_ids(30, seed=3), 100))
    for _ in range(4):
        s.step()
    used = s.kv.used_blocks()
    held_a = sum(len(t) for t in s.kv.held(a.seq))
    a.cancelled = True
    s.step()
    assert a.finish_reason == "cancelled" and events[-1].finish_reason == "cancelled"
    assert s.kv.used_blocks() <= used - held_a + 4  # b grew by at most one block per layer
    assert b in s.running and a not in s.running


def test_stop_ids_strings_and_prefix_cache(model):
    prompt = _ids(50, seed=9)
    free = llama4.generate(model, prompt, max_new_tokens=20, stop_ids=[])
    s = _sched(model)
    r = s.add(Request(prompt, 20, stop_ids=frozenset({free[5]})))
    while s.has_work():
        s.step()
    assert r.generated == free[:free.index(free[5]) + 1] and r.finish_reason == "stop"
    # Same prompt again: every full block but the one holding the last prompt token comes from the cache.
    r2 = s.add(Request(prompt, 20))
    while s.has_work():
        s.step()
    assert r2.generated == free and r2.reused == (len(prompt) - 1) // 8 * 8
    assert s.kv.hit_rate() > 0


def test_check_refuses_what_can_never_run(model):
    s = _sched(model, blocks=20)
    with pytest.raises(ValueError, match="KV blocks"):
        s.add(Request(_ids(100), 50))
    with pytest.raises(ValueError, match="context window"):
        s.add(Request(_ids(10), 5000))
    with pytest.raises(ValueError, match="vocabulary"):
        s.add(Request([1, 9999], 5))


def test_short_prompts_get_first_token_behind_a_long_prompt(model):
    """A burst of short prompts behind a long one gets first tokens in the next step; the long prompt
    keeps half the prefill budget every step, and every output still equals generate."""
    long_p, shorts = _ids(200, seed=3), [_ids(6 + k, seed=10 + k) for k in range(4)]
    ref = [llama4.generate(model, p, max_new_tokens=5, stop_ids=[]) for p in [long_p, *shorts]]
    s = _sched(model, prefill_chunk=64)
    reqs = [s.add(Request(long_p, 5))]
    s.step()
    assert reqs[0].computed == 64
    reqs += [s.add(Request(p, 5)) for p in shorts]
    s.step()
    assert all(len(r.generated) == 1 for r in reqs[1:])  # 6..9 tokens each: all fit beside the long one
    assert reqs[0].computed == 64 + 64 - (6 + 7 + 8 + 9)  # half promised, plus what the shorts left
    while s.has_work():
        s.step()
    assert [r.generated for r in reqs] == ref


def test_repetition_penalty_equals_generate(model):
    """Greedy and seeded sampling with a repetition penalty (which changes the argmax) equal generate,
    next to plain greedy requests that share the steps."""
    prompt = _ids(12, seed=5)
    kinds = [dict(temperature=0.0), dict(temperature=0.8, top_p=0.95)]
    refs = [llama4.generate(model, prompt, max_new_tokens=24, stop_ids=[], repetition_penalty=1.8, seed=3, **k)
            for k in kinds]
    assert refs[0] != llama4.generate(model, prompt, max_new_tokens=24, stop_ids=[])
    reqs = [Request(prompt, 24, SamplingParams(repetition_penalty=1.8, **k), seed=3) for k in kinds]
    s = _sched(model, prefill_chunk=8)
    out = s.run([Request(_ids(9, seed=6), 24), *reqs, Request(_ids(30, seed=7), 24)])
    assert out[1:3] == refs


# Scheduling policy: what each step runs (counted in positions, no timing) -----------------------------

def _positions(reqs):
    return [r.computed for r in reqs]


def test_decodes_advance_every_step_while_a_long_prompt_prefills(model):
    """Chunked prefill mixed with decode: every running request past its prompt gets exactly one token
    in every step, and a step never runs more prompt tokens than the budget."""
    s = _sched(model, prefill_chunk=32)
    decoders = [s.add(Request(_ids(5, seed=k), 40)) for k in range(3)]
    s.step()  # their prompts (15 tokens) fit in one step
    assert all(len(r.generated) == 1 for r in decoders)
    long_r = s.add(Request(_ids(150, seed=9), 3))
    for _ in range(4):
        before, long_before = [len(r.generated) for r in decoders], long_r.computed
        s.step()
        assert [len(r.generated) for r in decoders] == [b + 1 for b in before]
        assert 0 < long_r.computed - long_before <= 32
    assert long_r.computed == 4 * 32


def test_first_tokens_are_emitted_before_decode_tokens(model):
    """In a step that finishes a prompt, that request's first token is handed out before the running
    requests' decode tokens (its client waits for it; theirs already stream)."""
    order = []
    s = _sched(model, prefill_chunk=64)
    old = [s.add(Request(_ids(4, seed=k), 10, on_event=lambda ev, k=k: order.append(("old", k)))) for k in range(3)]
    s.step()
    order.clear()
    s.add(Request(_ids(7, seed=8), 10, on_event=lambda ev: order.append(("new", 0))))
    s.step()
    assert order[0] == ("new", 0) and sorted(order[1:]) == [("old", k) for k in range(3)]
    assert all(len(r.generated) == 2 for r in old)


def test_a_long_prompt_is_not_starved_by_arrivals(model):
    """The oldest unfinished prompt is promised half the budget each step, so a stream of short
    arrivals (each served shortest-first, first token in the step after it arrives) cannot starve it:
    its prefill ends within ceil(L / (budget / 2)) steps."""
    s = _sched(model, blocks=2000, prefill_chunk=32, max_running=64)
    long_r = s.add(Request(_ids(160, seed=1), 2))
    shorts, steps = [], 0
    while long_r.computed < 160:
        r = s.add(Request(_ids(12, seed=100 + steps), 2))
        s.step()
        steps += 1
        assert len(r.generated) == 1  # 12 tokens fit beside the long prompt's half
        shorts.append(r)
    assert steps <= -(-160 // 16)
    while s.has_work():
        s.step()
    assert all(r.finish_reason == "length" for r in [long_r, *shorts])


def test_prefill_budget_goes_to_fewest_tokens_left(model):
    """After the oldest prompt's half, the budget goes to the prompts closest to their first token."""
    s = _sched(model, prefill_chunk=40)
    reqs = [s.add(Request(_ids(n, seed=n), 2)) for n in (100, 50, 30, 12)]
    s.step()
    # oldest: 20 (half); then fewest left first: 12 (done, first token), then 8 of the 30-token prompt
    assert _positions(reqs) == [20, 0, 8, 12]
    assert len(reqs[3].generated) == 1 and not reqs[2].generated
    s.step()
    assert _positions(reqs) == [40, 0, 28, 13]
