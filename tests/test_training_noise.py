"""Gate noise of the training forward: the same (seed, process index,
accumulation micro-step, global step) gives bitwise the same decisions and
logits; changing any one of them changes the noise."""

import pytest
import torch

from dms import ops
from dms.tiny import tiny_model
from dms.training.engine import noise_counters


@pytest.fixture(scope="module")
def model():
    m = tiny_model(3, evicting=True, dms_window_size=8, dms_paged_attention_block_size=4).train()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def _run(model, counters):
    ids = torch.randint(0, 250, (2, 48), generator=torch.Generator().manual_seed(0))
    out = model.model(ids, use_cache=False, dms_noise_counters=counters)
    logits = model.lm_head(out.last_hidden_state)
    return out.dms_decisions, logits


def test_same_counters_same_noise(model):
    a = _run(model, noise_counters(5, 1, 2, 30))
    b = _run(model, noise_counters(5, 1, 2, 30))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert 0.2 < float(a[0].float().mean()) < 0.8


@pytest.mark.parametrize("changed", [dict(seed=6), dict(process_index=0), dict(accum_step=3), dict(global_step=31)])
def test_any_other_counter_other_noise(model, changed):
    base = dict(seed=5, process_index=1, accum_step=2, global_step=30)
    a = _run(model, noise_counters(**base))
    b = _run(model, noise_counters(**dict(base, **changed)))
    differing = float((a[0] != b[0]).float().mean())
    assert differing > 0.05  # decisions near the threshold flip with the noise
    assert not torch.equal(a[1], b[1])


def test_counters_are_the_philox_counters_of_the_ops():
    """The model draws exactly ops.logistic_noise_like(z, seed + layer, ...)."""
    z = torch.zeros(2, 2, 48)
    one = ops.logistic_noise_like(z, seed=5, process_index=1, accum_step=2, global_step=30)
    two = ops.logistic_noise_like(z, **noise_counters(5, 1, 2, 30))
    assert torch.equal(one, two)
    other = ops.logistic_noise_like(z, **noise_counters(5, 1, 2, 31))
    assert not torch.equal(one, other)
