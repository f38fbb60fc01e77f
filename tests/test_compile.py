"""torch.compile traces the DMS model without graph breaks: the kernels are
torch.library custom ops with fake implementations (dms.ops), and the
forward has no data-dependent Python branch. A training step is one graph,
and compiled (aot_eager: fake tensors, the registered autograd) it computes
what eager does."""

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
