"""torch.compile traces the DMS model without graph breaks: the kernels are
torch.library custom ops with fake implementations (dms.ops, and dms.cache
for the paged cache's append and attention), and the forward has no
data-dependent Python branch. A training step is one graph, and compiled
(aot_eager: fake tensors, the registered autograd) it computes what eager
does. A decode step over a cache whose pool has room is one graph too, and
compiled with Inductor it equals eager step after step, evictions and page
crossings included, without recompiling after the second step."""

import pytest
import torch

from dms.tiny import tiny_model


def _training_step(model):
    def step(ids, mask):
        out = model(input_ids=ids, attention_mask=mask, labels=ids, dms_target=0.5,
                    dms_noise_counters={"seed": 1, "process_index": 0, "accum_step": 0, "global_step": 3})
        return out.loss + out.compression_loss
    return step


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 300, (2, 48), generator=g)
    mask = torch.ones(2, 48, dtype=torch.long)
    mask[1, :5] = 0  # left padding
    return ids, mask


def test_a_training_step_is_one_graph():
    torch._dynamo.reset()
    model = tiny_model(seed=0).train()
    explained = torch._dynamo.explain(_training_step(model))(*_batch())
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1


@pytest.mark.parametrize("borrowed", [False, True], ids=["separate", "borrowed"])
def test_a_compiled_training_step_equals_eager(borrowed):
    torch._dynamo.reset()
    kwargs = dict(evicting=False, dms_separate_alpha=False) if borrowed else {}
    eager, compiled = (tiny_model(seed=0, **kwargs).train() for _ in range(2))
    compiled.load_state_dict(eager.state_dict())
    ids, mask = _batch()
    want = _training_step(eager)(ids, mask)
    want.backward()
    got = torch.compile(_training_step(compiled), backend="aot_eager", fullgraph=True)(ids, mask)
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)
    decided = "q_proj" if borrowed else "dms_proj_alpha"  # the decisions' gradient reached their source
    assert any(decided in n and p.grad.abs().sum() > 0 for n, p in compiled.named_parameters())


_SMALL_PAGES = dict(dms_window_size=12, dms_paged_attention_block_size=8)  # evictions and page crossings early


def _decode(model, cache, ids):
    return model(input_ids=ids, past_key_values=cache, use_cache=True).logits


def _prompt():
    return torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(0))


def test_a_decode_step_is_one_graph():
    torch._dynamo.reset()
    model = tiny_model(seed=0, **_SMALL_PAGES).eval()
    cache = model.get_cache(preallocate_for_tokens=128)
    with torch.no_grad():
        next_ids = _decode(model, cache, _prompt())[:, -1:].argmax(-1)
        explained = torch._dynamo.explain(_decode)(model, cache, next_ids)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1


def _compiled_against_eager(backend, steps, preallocate, device="cpu", **compile_kwargs):
    """Greedy decoding of `steps` tokens, eager and compiled, each model with
    its own cache; asserts equal logits at every step and returns
    (compression ratios, dynamo stats after step 2, at the end)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager, compiled = (tiny_model(seed=0, **_SMALL_PAGES).eval().to(device) for _ in range(2))
    compiled.load_state_dict(eager.state_dict())
    eager_cache, compiled_cache = eager.get_cache(), compiled.get_cache(preallocate_for_tokens=preallocate)
    step = torch.compile(_decode, backend=backend, **compile_kwargs)
    with torch.no_grad():
        want = _decode(eager, eager_cache, _prompt().to(device))
        got = _decode(compiled, compiled_cache, _prompt().to(device))
        for i in range(steps):
            next_ids = want[:, -1:].argmax(-1)
            want, got = _decode(eager, eager_cache, next_ids), step(compiled, compiled_cache, next_ids)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"decode step {i}")
            if i == 1:
                early = dict(counters["stats"])
    assert compiled_cache.get_seq_length() == eager_cache.get_seq_length() == 40 + steps
    ratios = compiled_cache.compression_ratios(), eager_cache.compression_ratios()
    return ratios, early, dict(counters["stats"])


def test_a_compiled_decode_loop_equals_eager_and_compiles_twice():
    """Inductor: the positions a step reads are taken before its appends
    advance the counters (dms.cache._snapshot_op); without that the query's
    RoPE used the next position. The page table is sized for the model's
    positions and the pool preallocated, so after the second step (where
    Dynamo makes the counters symbolic) nothing recompiles."""
    (got, want), early, late = _compiled_against_eager("inductor", 24, preallocate=128, fullgraph=True)
    assert got == want and max(got) > 1.2  # tokens were evicted, identically
    assert early["unique_graphs"] == late["unique_graphs"] == 2


def test_a_compiled_decode_loop_equals_eager_while_the_pool_grows():
    """No preallocation: the step where the pool runs short reads the free
    count and grows it eagerly (a graph break, then new page shapes); the
    result is still eager's."""
    (got, want), _, _ = _compiled_against_eager("aot_eager", 30, preallocate=None)
    assert got == want and max(got) > 1.2


@pytest.mark.cuda
def test_a_compiled_decode_loop_equals_eager_on_cuda():
    (got, want), early, late = _compiled_against_eager("inductor", 24, preallocate=128, device="cuda")
    assert got == want and max(got) > 1.2
    assert early["unique_graphs"] == late["unique_graphs"]
