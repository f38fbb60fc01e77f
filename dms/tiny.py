"""The built-in tiny Qwen3-DMS and its tokenizer: what the demo, the `tiny`
training config, the notebook and the tests run on, with nothing downloaded.

The tokenizer is byte-level (every UTF-8 byte is a token, so any text
round-trips) plus Qwen3's special tokens and a Qwen3-style chat template that
understands `enable_thinking`. The model is a 4-layer Qwen3-DMS small enough
to train on a CPU in minutes.
"""

import torch

__all__ = ["tiny_tokenizer", "tiny_config", "tiny_model", "save_tiny", "TINY_VOCAB_SIZE"]

# 256 byte tokens, then the special tokens below; the model's vocabulary is
# rounded up to a multiple of 64.
_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
TINY_VOCAB_SIZE = 320

# Qwen3's layout: <|im_start|>role\ncontent<|im_end|>\n per message; with
# add_generation_prompt the assistant turn is opened, and enable_thinking=False
# pre-fills an empty think block, as Qwen3's own template does.
_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<|im_start|>assistant\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{ '<think>\n\n</think>\n\n' }}"
    "{%- endif -%}"
    "{%- endif -%}"
)


def tiny_tokenizer():
    """A byte-level `PreTrainedTokenizerFast` made in-process: ids 0..255 are
    bytes, then `<|endoftext|>` (eos and pad), `<|im_start|>`, `<|im_end|>`,
    `<think>`, `</think>`; a Qwen3-style chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_chars = sorted(alphabet, key=lambda c: _byte_of(c))
    vocab = {c: i for i, c in enumerate(byte_chars)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(_SPECIAL)
    out = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                  additional_special_tokens=_SPECIAL[1:])
    out.chat_template = _CHAT_TEMPLATE
    out.model_max_length = 8192
    return out


def _byte_of(char):
    """The byte that GPT-2's byte-to-unicode table maps to `char`."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    code = ord(char)
    if code in printable:
        return code
    shifted = [b for b in range(256) if b not in printable]
    return shifted[code - 256]


def tiny_config(**overrides):
    """A `Qwen3ConfigDMS` for the tiny model: 4 layers, hidden 128, 8 query
    heads over 2 KV heads of dim 32, window 64, pages of 16; `overrides`
    replace any field."""
    from .models.qwen3 import Qwen3ConfigDMS

    fields = dict(vocab_size=TINY_VOCAB_SIZE, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=2, head_dim=32, max_position_embeddings=8192,
                  dms_window_size=64, dms_paged_attention_block_size=16, dms_preallocate_for_tokens=None,
                  bos_token_id=None, eos_token_id=256, pad_token_id=256, tie_word_embeddings=True)
    fields.update(overrides)
    return Qwen3ConfigDMS(**fields)


def tiny_model(seed=0, evicting=True, **overrides):
    """The tiny Qwen3-DMS with deterministic weights (`torch.manual_seed(seed)`).

    evicting=True (default) gives its adapters random weights (separate
    adapter, scale 1, offset 0) so about half of the decisions evict and
    compression shows at once; evicting=False gives fresh separate adapters
    with the reference's scale and offset (every logit is -offset: nothing
    evicted until trained). `overrides` win over both."""
    from .models.qwen3 import Qwen3ForCausalLMDMS

    if evicting:
        overrides = dict(dict(dms_separate_alpha=True, dms_alpha_scale=1.0, dms_initial_alpha_offset=0.0),
                         **overrides)
    else:
        overrides = dict(dict(dms_separate_alpha=True), **overrides)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLMDMS(tiny_config(**overrides))
    if evicting:
        with torch.no_grad():
            for layer in model.model.layers:
                torch.nn.init.normal_(layer.self_attn.dms_proj_alpha.weight, std=0.5)
    return model


def save_tiny(path, seed=0, evicting=True, **overrides):
    """Write the tiny model and its tokenizer to `path` (a directory that
    `from_pretrained`, `trust_remote_code` loaders and lm-eval accept);
    returns `path`."""
    tiny_model(seed, evicting, **overrides).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path
