"""The retrofit training engine (SPEC §6) on the Hugging Face Trainer.

Per micro-step `DMSTrainer.compute_loss` runs
  1. the teacher under no_grad: the student's own weights with eviction off
     (the same model, a second pass) or a separate frozen model;
  2. the student with noised gates, the Gumbel noise a pure function of
     (seed, process index, gradient-accumulation micro-step, global step),
     so a resumed or re-run step draws the same noise;
  3. loss = forward KL(student || teacher), averaged over positions that are
     neither padding nor end-of-sequence, computed a chunk of positions at a
     time (`forward_kl`), plus the compression loss
     mean_b max(0, target - mean(a)) that the model returns for
     target = 1 - 1/cr(step), cr rising linearly (`cr_schedule`).
It logs, through the Trainer (tqdm, TensorBoard when installed), the
distillation and compression losses, the target and achieved compression
ratios and the student's LM loss (detached).

Shapes: B batch, T tokens, V vocabulary.
"""

import copy
import os

import torch
from transformers import Trainer

__all__ = [
    "DMSTrainer",
    "cr_schedule",
    "eos_token_ids",
    "forward_kl",
    "freeze_for_training",
    "is_adapter_parameter",
    "lm_loss",
    "load_student",
    "load_teacher",
    "load_tokenizer",
    "loss_mask",
    "noise_counters",
    "resolve_resume",
    "save_student_model",
    "torch_dtype",
]


def torch_dtype(name):
    """torch.float32 for "float32", and so on."""
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


# --- schedule and noise ---

def cr_schedule(step, initial_cr, final_cr, final_step):
    """Target compression ratio at optimiser step `step`: linear from
    `initial_cr` at step 0 to `final_cr` at `final_step`, constant after.
    The fraction of decisions to evict is 1 - 1/cr."""
    if final_step < 1:
        raise ValueError(f"final_step: expected an int >= 1, got {final_step!r}")
    progress = min(max(step, 0) / final_step, 1.0)
    return initial_cr + (final_cr - initial_cr) * progress


def noise_counters(seed, process_index, accum_step, global_step):
    """The `dms_noise_counters` argument of the model's forward: the gate
    noise of layer l is Philox keyed by seed + l with counter (position,
    process_index, accum_step, global_step)."""
    return {"seed": int(seed), "process_index": int(process_index), "accum_step": int(accum_step),
            "global_step": int(global_step)}


# --- losses ---

def eos_token_ids(tokenizer, model_config=None):
    """End-of-sequence ids: the tokenizer's eos plus the model config's
    eos_token_id (an int or a list)."""
    ids = set()
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    eos = getattr(model_config, "eos_token_id", None) if model_config is not None else None
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, (list, tuple)):
        ids.update(int(e) for e in eos)
    return sorted(ids)


def loss_mask(input_ids, attention_mask, eos_ids):
    """[B, T] bool: positions that are neither padding (attention_mask 0)
    nor an end-of-sequence token; the distillation loss averages over these."""
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    if eos_ids:
        mask = mask & ~torch.isin(input_ids, torch.as_tensor(eos_ids, device=input_ids.device))
    return mask


def _chunks(T, size):
    return [(t, min(t + size, T)) for t in range(0, T, size)]


class _ForwardKL(torch.autograd.Function):
    """sum over masked positions of KL(softmax(s) || softmax(t)), chunked
    over positions. The backward recomputes each chunk and writes the exact
    gradient p_s * (log p_s - log p_t - KL_row) into one grad tensor in the
    logits' dtype, so no float32 copy of the whole [B, T, V] logits ever
    exists, in forward or backward."""

    @staticmethod
    def forward(ctx, student, teacher, mask, chunk):
        B, T, _ = student.shape
        row_kl = torch.zeros(B, T, dtype=torch.float32, device=student.device)
        for b in range(B):
            for t0, t1 in _chunks(T, chunk):
                if not bool(mask[b, t0:t1].any()):
                    continue
                log_s = torch.log_softmax(student[b, t0:t1].float(), dim=-1)
                log_t = torch.log_softmax(teacher[b, t0:t1].float(), dim=-1)
                row_kl[b, t0:t1] = (log_s.exp() * (log_s - log_t)).sum(-1)
        row_kl = row_kl * mask
        ctx.save_for_backward(student, teacher, mask, row_kl)
        ctx.chunk = chunk
        return row_kl.sum()

    @staticmethod
    def backward(ctx, grad_out):
        student, teacher, mask, row_kl = ctx.saved_tensors
        grad = torch.zeros_like(student)
        B, T, _ = student.shape
        for b in range(B):
            for t0, t1 in _chunks(T, ctx.chunk):
                m = mask[b, t0:t1]
                if not bool(m.any()):
                    continue
                log_s = torch.log_softmax(student[b, t0:t1].float(), dim=-1)
                log_t = torch.log_softmax(teacher[b, t0:t1].float(), dim=-1)
                g = log_s.exp() * (log_s - log_t - row_kl[b, t0:t1, None])
                grad[b, t0:t1] = (g * (m[:, None] * grad_out)).to(grad.dtype)
        return grad, None, None, None


def forward_kl(student_logits, teacher_logits, mask, chunk_size=512):
    """Distillation loss of SPEC §6: KL(student || teacher) per position over
    the vocabulary, averaged over the positions where `mask` is true.

    Args:
        student_logits: [B, T, V] (any float dtype; differentiable).
        teacher_logits: [B, T, V], no gradient.
        mask: [B, T] bool (see `loss_mask`).
        chunk_size: positions per chunk; the float32 working set is a few
            chunk_size x V arrays.

    Returns a float32 scalar (0 when no position is masked in).
    """
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 3:
        raise ValueError(f"teacher_logits: expected the student's shape [B, T, V] "
                         f"{tuple(student_logits.shape)}, got {tuple(teacher_logits.shape)}")
    if mask.shape != student_logits.shape[:2]:
        raise ValueError(f"mask: expected shape {tuple(student_logits.shape[:2])}, got {tuple(mask.shape)}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size: expected an int >= 1, got {chunk_size!r}")
    mask = mask.bool()
    total = _ForwardKL.apply(student_logits, teacher_logits.detach(), mask, chunk_size)
    return total / mask.sum().clamp_min(1)


@torch.no_grad()
def lm_loss(logits, input_ids, mask, attention_mask=None, chunk_size=512):
    """Next-token cross-entropy of the student (for logging; no gradient):
    predictions from positions where `mask` is true of a next token that is
    not padding, averaged. logits [B, T, V], input_ids [B, T]."""
    B, T, _ = logits.shape
    valid = mask[:, :-1].clone()
    if attention_mask is not None:
        valid &= attention_mask[:, 1:].bool()
    total = torch.zeros((), dtype=torch.float64, device=logits.device)
    for b in range(B):
        for t0, t1 in _chunks(T - 1, chunk_size):
            m = valid[b, t0:t1]
            if not bool(m.any()):
                continue
            rows = logits[b, t0:t1].float()
            picked = rows.gather(-1, input_ids[b, t0 + 1:t1 + 1, None])[:, 0]
            total += ((rows.logsumexp(-1) - picked) * m).sum().double()
    return (total / valid.sum().clamp_min(1)).float()


# --- models ---

def load_tokenizer(model_config):
    """The tokenizer of `model_config` (a `config.ModelConfig`)."""
    name = model_config.tokenizer or model_config.name_or_path
    if name == "tiny":
        from dms.tiny import tiny_tokenizer

        return tiny_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name)


def _load_dms_model(config, name_or_path, dtype, overrides, show_progress=True):
    from dms.models import AutoModelForCausalLMDMS

    if name_or_path == "tiny":
        if not config.model.tiny_lm_steps:
            from dms.tiny import tiny_model

            return tiny_model(config.model.init_seed, evicting=False, **overrides).to(dtype)
        from dms.training.tiny_lm import ensure_tiny_lm

        name_or_path = ensure_tiny_lm(config, show_progress=show_progress)
    # The family (Qwen3, Llama, Qwen2, Mistral, Qwen3-MoE) comes from the checkpoint's model_type.
    return AutoModelForCausalLMDMS.from_pretrained(name_or_path, dtype=dtype, **overrides)


def load_student(config, show_progress=True):
    """The student DMS model of `config` (a TrainingConfig), of the family its
    checkpoint's model_type names: a plain checkpoint gets fresh adapters
    that keep everything;
    `model.dms` keys override the checkpoint's DMS fields. Eviction is on."""
    m = config.model
    model = _load_dms_model(config, m.name_or_path, torch_dtype(m.dtype), m.dms.overrides(), show_progress)
    model.config.dms_disable_eviction = False
    return model


def load_teacher(config, student, show_progress=True):
    """The frozen teacher: the model at config.teacher.name_or_path; with
    none named, None (the student's own weights with eviction off, one model
    and two passes) unless distillation.train_all_weights, when a frozen
    copy of the student's initial weights is the teacher."""
    t = config.teacher
    dtype = torch_dtype(t.dtype or config.model.dtype)
    if t.name_or_path is None:
        if not config.distillation.train_all_weights:
            return None
        # Every weight of the student moves: distil from a frozen copy of
        # where it started, not from its own drifting weights.
        teacher = copy.deepcopy(student).to(dtype)
    elif t.name_or_path == "tiny":  # the built-in model, as the student is built
        overrides = dict(config.model.dms.overrides(), dms_disable_eviction=True)
        teacher = _load_dms_model(config, "tiny", dtype, overrides, show_progress)
    elif _is_dms_checkpoint(t.name_or_path):
        teacher = _load_dms_model(config, t.name_or_path, dtype, {"dms_disable_eviction": True}, show_progress)
    else:  # a plain causal LM (e.g. a larger model of the family): transformers' own model
        from transformers import AutoModelForCausalLM

        teacher = AutoModelForCausalLM.from_pretrained(t.name_or_path, dtype=dtype)
    if teacher.config.vocab_size != student.config.vocab_size:
        raise ValueError(f"teacher.name_or_path: the teacher's vocabulary ({teacher.config.vocab_size}) differs "
                         f"from the student's ({student.config.vocab_size}); distillation compares them token by token")
    teacher.requires_grad_(False)
    if hasattr(teacher.config, "dms_disable_eviction"):
        teacher.config.dms_disable_eviction = True
        # Training mode: a DMS model's whole-sequence attention (its eval
        # mode goes through the paged cache); with eviction off nothing is
        # noised and DMS attention has no dropout (the families' MLPs have
        # none), so this forward is deterministic.
        teacher.train()
    else:
        teacher.eval()
    return teacher


def _is_dms_checkpoint(name_or_path):
    """True when the checkpoint's config carries the DMS fields."""
    from transformers import PretrainedConfig

    config, _ = PretrainedConfig.get_config_dict(name_or_path)
    return "dms_window_size" in config


def is_adapter_parameter(name):
    """True for the DMS adapter parameters (`dms_proj_alpha`, `dms_proj_alpha_norm`)."""
    return ".dms_proj_alpha." in name or ".dms_proj_alpha_norm." in name


def freeze_for_training(model, train_all_weights=False, trainable_dtype=None):
    """requires_grad on the DMS adapters only (or on everything), optionally
    casting the trained parameters to `trainable_dtype`. Returns the names
    of the trained parameters."""
    names = []
    for name, p in model.named_parameters():
        train = train_all_weights or is_adapter_parameter(name)
        p.requires_grad_(train)
        if train:
            names.append(name)
            if trainable_dtype is not None and p.dtype != trainable_dtype:
                p.data = p.data.to(trainable_dtype)
    if not names:
        raise ValueError("model.dms.separate_alpha: adapters-only training needs separate DMS adapters "
                         "(dms_separate_alpha true), but this model borrows a query neuron and has none; set "
                         "model.dms.separate_alpha: true or distillation.train_all_weights: true")
    return names


def save_student_model(model, path, *, dtype, tokenizer=None, state_dict=None, final_cr=None):
    """Write `model` (a DMS causal LM of any family) to `path` in `dtype`, loadable by
    `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`,
    with the tokenizer next to it. `state_dict` (e.g. gathered from FSDP)
    replaces the model's own tensors."""
    if state_dict is None:
        state_dict = model.state_dict()
    state_dict = {k: (v.detach().to("cpu", dtype) if v.is_floating_point() else v.detach().cpu())
                  for k, v in state_dict.items()}
    config = model.config
    live = {"dms_disable_eviction": config.dms_disable_eviction, "dms_cr": config.dms_cr,
            "dtype": getattr(config, "dtype", None)}
    config.dms_disable_eviction = False
    if final_cr is not None:
        config.dms_cr = final_cr
    try:
        model.save_pretrained(path, state_dict=state_dict)
        # save_pretrained records the live parameters' dtype; the file holds `dtype`.
        config.dtype = dtype
        config.save_pretrained(path)
    finally:
        for key, value in live.items():
            setattr(config, key, value)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


# --- the trainer ---

class DMSTrainer(Trainer):
    """`transformers.Trainer` whose loss is SPEC §6's distillation plus
    compression loss.

    Args:
        distillation: a `config.DistillationConfig`.
        final_step: step at which the CR ramp ends.
        teacher: a separate frozen teacher model, or None (the student's own
            weights with eviction off).
        eos_ids: token ids excluded from the distillation loss (with padding).
        noise_seed: seed of the gate noise (default: args.seed).
        **kwargs: `Trainer` arguments (model, args, train_dataset, ...).
    """

    _METRICS = ("distill_loss", "compression_loss", "lm_loss", "evicted_fraction", "target_fraction", "target_cr")

    def __init__(self, *, distillation, final_step, teacher=None, eos_ids=(), noise_seed=None, **kwargs):
        super().__init__(**kwargs)
        self.distillation = distillation
        self.final_step = final_step
        self.teacher = teacher
        self.eos_ids = list(eos_ids)
        self.noise_seed = self.args.seed if noise_seed is None else noise_seed
        # Our loss is a per-micro-batch mean: let the Trainer divide by the
        # accumulation steps.
        self.loss_is_scaled_for_ga = False
        if teacher is not None:
            teacher.to(self.args.device)
        self._accum_owner = None
        self._accum_step = 0
        self._sums = None
        self._count = 0

    def current_cr(self):
        """Target compression ratio at the current global step."""
        d = self.distillation
        return cr_schedule(self.state.global_step, d.initial_cr, d.final_cr, self.final_step)

    def current_noise_counters(self):
        """Noise counters of the micro-step being run: (seed, this process,
        the micro-step within the accumulation, the global step)."""
        return noise_counters(self.noise_seed, self.args.process_index, self._accum_step, self.state.global_step)

    def training_step(self, model, inputs, num_items_in_batch=None):
        # The micro-step index restarts at 0 whenever the global step moves,
        # which also holds for the first micro-step after a resume.
        if self._accum_owner != self.state.global_step:
            self._accum_owner, self._accum_step = self.state.global_step, 0
        else:
            self._accum_step += 1
        return super().training_step(model, inputs, num_items_in_batch)

    def _teacher_logits(self, model, input_ids, attention_mask):
        with torch.no_grad():
            if self.teacher is not None:
                with self.accelerator.autocast():
                    return self.teacher(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            student = self.accelerator.unwrap_model(model)
            student.config.dms_disable_eviction = True
            try:
                return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            finally:
                student.config.dms_disable_eviction = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        input_ids = inputs["input_ids"]
        attention_mask = inputs.get("attention_mask")
        cr = self.current_cr()
        target = 1.0 - 1.0 / cr
        teacher_logits = self._teacher_logits(model, input_ids, attention_mask)
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                    dms_noise_counters=self.current_noise_counters(), dms_target=target)
        mask = loss_mask(input_ids, attention_mask, self.eos_ids)
        chunk = self.distillation.kl_chunk_size
        distill = forward_kl(out.logits, teacher_logits, mask, chunk)
        del teacher_logits
        loss = distill + out.compression_loss.float()
        if model.training:
            self._record(distill, out.compression_loss, lm_loss(out.logits, input_ids, mask, attention_mask, chunk),
                         out.evicted_fraction.mean(), target, cr)
        return (loss, out) if return_outputs else loss

    def _record(self, distill, compression, lm, evicted, target, cr):
        values = torch.stack([distill.detach().float(), compression.detach().float(), lm.detach().float(),
                              evicted.detach().float(),
                              torch.tensor(target, device=distill.device), torch.tensor(cr, device=distill.device)])
        self._sums = values if self._sums is None else self._sums + values
        self._count += 1

    def log(self, logs, start_time=None):
        """The Trainer's training log plus, averaged over the micro-steps since
        the last log and over processes: distill_loss, compression_loss,
        lm_loss, evicted_fraction, target_fraction, target_cr and
        achieved_cr = 1 / (1 - evicted_fraction)."""
        if "loss" in logs and self._sums is not None:
            means = self._sums / self._count
            if self.accelerator.num_processes > 1:  # every process logs at the same steps
                means = self.accelerator.reduce(means, reduction="mean")
            means = means.tolist()
            values = dict(zip(self._METRICS, means))
            values["achieved_cr"] = 1.0 / max(1.0 - values["evicted_fraction"], 1e-6)
            for key in ("distill_loss", "compression_loss", "lm_loss", "target_cr", "achieved_cr",
                        "evicted_fraction", "target_fraction"):
                logs[key] = values[key]
            self._sums, self._count = None, 0
        super().log(logs, start_time)


def resolve_resume(setting, output_dir):
    """The checkpoint to resume from for trainer.resume_from_checkpoint:
    None -> None; "auto" -> the newest output_dir/checkpoint-N (None when
    there is none); a path -> that path (which must exist)."""
    if setting is None:
        return None
    if setting == "auto":
        from transformers.trainer_utils import get_last_checkpoint

        return get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
    if not os.path.isdir(setting):
        raise FileNotFoundError(f"trainer.resume_from_checkpoint: no checkpoint directory {setting!r}")
    return setting
