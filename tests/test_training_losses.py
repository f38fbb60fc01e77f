"""SPEC §6 losses against direct float64 formulas: the chunked forward KL
(value and gradient, padding and EOS masked, every chunking equal), the LM
loss, the model's compression loss, the CR schedule, and DMSTrainer's total
loss assembled from a teacher pass with eviction off and a noised student
pass."""

import math

import pytest
import torch

from dms.tiny import tiny_model, tiny_tokenizer
from dms.training.engine import cr_schedule, forward_kl, lm_loss, loss_mask, noise_counters


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _kl64(student, teacher, mask):
    """mean over masked positions of sum_v p_s (log p_s - log p_t), in float64."""
    ls = torch.log_softmax(student.double(), -1)
    lt = torch.log_softmax(teacher.double(), -1)
    per = (ls.exp() * (ls - lt)).sum(-1)
    return (per * mask.double()).sum() / mask.double().sum()


def _batch(B=3, T=11, V=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(B, T, V, generator=g) * 3).requires_grad_()
    teacher = torch.randn(B, T, V, generator=g) * 3
    input_ids = torch.randint(0, V - 1, (B, T), generator=g)
    attention_mask = torch.ones(B, T, dtype=torch.long)
    attention_mask[0, -4:] = 0       # right padding
    attention_mask[2, :2] = 0        # left padding
    input_ids[1, 5] = V - 1          # an EOS inside a row
    input_ids[0, 3] = V - 1
    return student, teacher, input_ids, attention_mask


def test_loss_mask_drops_padding_and_eos():
    _, _, ids, am = _batch()
    mask = loss_mask(ids, am, [36])
    expected = (am == 1) & (ids != 36)
    assert torch.equal(mask, expected)
    assert int(mask.sum()) == 3 * 11 - 4 - 2 - 2


@pytest.mark.parametrize("chunk", [1, 3, 4, 11, 512])
def test_forward_kl_matches_float64_value_and_gradient(chunk):
    student, teacher, ids, am = _batch()
    mask = loss_mask(ids, am, [36])
    ours = forward_kl(student, teacher, mask, chunk)
    ours.backward()
    s64 = student.detach().double().requires_grad_()
    ref = _kl64(s64, teacher, mask)
    ref.backward()
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(student.grad.double(), s64.grad, rtol=1e-5, atol=1e-8)
    # Masked positions get no gradient at all.
    assert float(student.grad[~mask].abs().max()) == 0.0


def test_chunked_kl_equals_unchunked_exactly_per_row():
    """Chunking only splits rows: every chunk size gives the same sum."""
    student, teacher, ids, am = _batch(B=3, T=29, V=53, seed=3)
    ids[ids == 36] = 52
    mask = loss_mask(ids, am, [52])
    values = [forward_kl(student, teacher, mask, c).item() for c in (1, 2, 5, 7, 29, 1000)]
    assert max(values) - min(values) <= 1e-6 * abs(values[0])


def test_forward_kl_bfloat16_logits_grad_in_bfloat16():
    student, teacher, ids, am = _batch()
    mask = loss_mask(ids, am, [36])
    s16 = student.detach().bfloat16().requires_grad_()
    ours = forward_kl(s16, teacher.bfloat16(), mask, 4)
    ours.backward()
    ref = _kl64(s16.detach().double(), teacher.bfloat16().double(), mask)
    assert s16.grad.dtype == torch.bfloat16
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-6)


def test_forward_kl_zero_for_identical_and_rejects_bad_shapes():
    student, _, ids, am = _batch()
    mask = loss_mask(ids, am, [36])
    assert forward_kl(student, student.detach().clone(), mask).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="teacher_logits"):
        forward_kl(student, student[:, :-1].detach(), mask)
    with pytest.raises(ValueError, match="mask"):
        forward_kl(student, student.detach(), mask[:, :-1])
    with pytest.raises(ValueError, match="chunk_size"):
        forward_kl(student, student.detach(), mask, 0)


def test_lm_loss_matches_float64():
    student, _, ids, am = _batch()
    mask = loss_mask(ids, am, [36])
    ours = lm_loss(student, ids, mask, am, chunk_size=3)
    logp = torch.log_softmax(student.detach().double(), -1)
    total, count = 0.0, 0
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1] - 1):
            if mask[b, t] and am[b, t + 1]:
                total -= float(logp[b, t, ids[b, t + 1]])
                count += 1
    assert ours.item() == pytest.approx(total / count, rel=1e-6)


def test_cr_schedule_is_linear_then_flat():
    assert cr_schedule(0, 1.0, 16.0, 510) == 1.0
    assert cr_schedule(238, 1.0, 16.0, 510) == pytest.approx(8.0)
    assert cr_schedule(510, 1.0, 16.0, 510) == 16.0
    assert cr_schedule(544, 1.0, 16.0, 510) == 16.0
    with pytest.raises(ValueError, match="final_step"):
        cr_schedule(1, 1.0, 2.0, 0)


def _padded_inputs(model, B=3, T=40):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 250, (B, T), generator=g)
    am = torch.ones(B, T, dtype=torch.long)
    am[1, -7:] = 0
    ids[1, -7:] = model.config.pad_token_id
    ids[2, 10] = ids[0, 20] = model.config.eos_token_id
    return ids, am


def test_model_compression_loss_matches_float64_from_decisions():
    """mean_b max(0, target - mean over layers, heads, real tokens of a)."""
    m = tiny_model(1, evicting=True).train()
    ids, am = _padded_inputs(m)
    counters = noise_counters(7, 0, 1, 3)
    target = 0.6
    out = m(ids, attention_mask=am, use_cache=False, dms_noise_counters=counters, dms_target=target)
    a = m.model(ids, attention_mask=am, use_cache=False, dms_noise_counters=counters).dms_decisions.double()
    real = am.double()[None, :, None, :]  # [1, B, 1, T]
    frac = (a * real).sum((0, 2, 3)) / (real.sum((0, 2, 3)) * a.shape[0] * a.shape[2])
    expected = torch.clamp(target - frac, min=0).mean()
    assert 0.0 < float(expected.detach()) < target  # the batch is partly evicted
    torch.testing.assert_close(out.evicted_fraction.double(), frac, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.compression_loss.double(), expected, rtol=1e-6, atol=1e-7)


def test_trainer_loss_is_kl_to_eviction_off_teacher_plus_compression(tmp_path):
    """DMSTrainer.compute_loss = float64 KL(student || same weights with
    eviction off) over real, non-EOS positions + the compression loss at the
    schedule's target, with the micro-step's noise counters."""
    from transformers import TrainingArguments

    from dms.training.config import DistillationConfig
    from dms.training.engine import DMSTrainer, freeze_for_training

    m = tiny_model(2, evicting=True, dms_window_size=8, dms_paged_attention_block_size=4)
    freeze_for_training(m)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, seed=11,
                             per_device_train_batch_size=3)
    dist = DistillationConfig(initial_cr=1.0, final_cr=5.0, final_step=10, kl_chunk_size=7)
    trainer = DMSTrainer(model=m, args=args, distillation=dist, final_step=10, eos_ids=[m.config.eos_token_id],
                         processing_class=tiny_tokenizer())
    trainer.state.global_step = 4
    trainer._accum_step = 1
    ids, am = _padded_inputs(m)
    m.train()
    loss = trainer.compute_loss(m, {"input_ids": ids, "attention_mask": am})

    target = 1 - 1 / cr_schedule(4, 1.0, 5.0, 10)
    counters = noise_counters(11, 0, 1, 4)
    with torch.no_grad():
        student = m(ids, attention_mask=am, use_cache=False, dms_noise_counters=counters, dms_target=target)
        m.config.dms_disable_eviction = True
        teacher = m(ids, attention_mask=am, use_cache=False).logits
        m.config.dms_disable_eviction = False
    mask = (am == 1) & (ids != m.config.eos_token_id)
    expected = _kl64(student.logits, teacher, mask) + student.compression_loss.double()
    assert float(_kl64(student.logits, teacher, mask)) > 1e-4  # eviction really changes the student
    assert math.isfinite(loss.item())
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-7)
