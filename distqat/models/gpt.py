"""Causal language models from transformers: ``distilgpt2`` (GPT-2, 6 layers) and ``gptneo``
(GPT-Neo at the 125M shape; ``GPTNeoConfig``'s own defaults are the 1.3B shape).

Blocks: the embedding (token ids ``(B, T)`` -> hidden states; positions ``0..T-1`` computed
here), one block per transformer layer, the head (final LayerNorm + LM head -> logits
``(B, T, V)``). The LM head is untied from the token embedding (``tie_word_embeddings=False``)
so no weight is shared across stages; a pretrained file that ties them gives the head a copy.

Each layer block builds its causal mask itself with transformers' ``create_causal_mask``, the
function the HF model calls once for all layers: under ``sdpa`` that is "none, use is_causal",
under ``eager`` an additive mask (without it a GPT-2 layer would attend to the future). GPT-Neo
supports eager attention only; its local layers also keep their own sliding-window buffer.

Random init is HF's ``_init_weights`` (normal(0, 0.02) weights, zero biases, unit norms, and
GPT-2's ``c_proj`` weights at ``0.02 / sqrt(2 * n_layer)``), applied block by block.
``pretrained`` names a local ``save_pretrained`` folder: its ``config.json`` fixes the shape
and each block reads only its own tensors from ``model.safetensors``.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
from torch import nn

from . import register_model
from .hf import HFBlock, import_transformers, init_hf_block, make_config


def _positions(x: torch.Tensor) -> torch.Tensor:
    return torch.arange(x.shape[1], device=x.device).unsqueeze(0)


class GPTEmbedding(HFBlock):
    def __init__(self, model, source):
        t = model.transformer
        super().__init__(model.config, type(model), {"wte": "transformer.wte",
                                                     "wpe": "transformer.wpe",
                                                     "drop": "transformer.drop"}, source)
        self.wte, self.wpe, self.drop = t.wte, t.wpe, t.drop

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.drop(self.wte(input_ids) + self.wpe(_positions(input_ids)))


class GPTLayer(HFBlock):
    def __init__(self, model, index: int, source):
        super().__init__(model.config, type(model), {"layer": f"transformer.h.{index}"}, source)
        self.layer = model.transformer.h[index]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        from transformers.masking_utils import create_causal_mask

        pos = _positions(hidden)
        if hidden.is_meta:  # cost counting: HF's mask code reads values; same FLOPs either way
            t = hidden.shape[1]
            mask = torch.zeros(1, 1, t, t, dtype=hidden.dtype, device=hidden.device)
        else:
            mask = create_causal_mask(config=self.config, inputs_embeds=hidden,
                                      attention_mask=None, past_key_values=None, position_ids=pos)
        out = self.layer(hidden, attention_mask=mask, position_ids=pos)
        return out[0] if isinstance(out, tuple) else out

    def reset_buffers(self) -> None:
        attn = getattr(getattr(self.layer, "attn", None), "attention", None)
        if attn is not None and hasattr(attn, "bias"):  # GPT-Neo: causal (+ local) window
            n = self.config.max_position_embeddings
            bias = torch.tril(torch.ones((n, n), dtype=torch.bool)).view(1, 1, n, n)
            if attn.attention_type == "local":
                bias = torch.bitwise_xor(bias, torch.tril(bias, -self.config.window_size))
            attn.bias.copy_(bias)


class GPTHead(HFBlock):
    tied = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, model, source):
        super().__init__(model.config, type(model), {"ln_f": "transformer.ln_f",
                                                     "lm_head": "lm_head"}, source)
        self.ln_f, self.lm_head = model.transformer.ln_f, model.lm_head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.ln_f(hidden))


def _gpt_blocks(model, source) -> List[nn.Module]:
    layers = [GPTLayer(model, i, source) for i in range(len(model.transformer.h))]
    return [GPTEmbedding(model, source), *layers, GPTHead(model, source)]


def _check_io(config, vocab_size: int, seq_len: int, positions: int) -> None:
    if config.vocab_size != vocab_size:
        raise ValueError(f"the model's vocab_size is {config.vocab_size}, the task's tokenizer "
                         f"has {vocab_size}")
    if seq_len > positions:
        raise ValueError(f"data seq_len {seq_len} is longer than the model's {positions} "
                         f"positions")


@register_model("distilgpt2", init=init_hf_block)
def distilgpt2_blocks(vocab_size: int, seq_len: int, n_layer: int = 6, n_embd: int = 768,
                      n_head: int = 12, n_positions: int = 1024,
                      attn_implementation: str = "sdpa", pretrained: Optional[str] = None,
                      config: Optional[Dict[str, Any]] = None) -> List[nn.Module]:
    """DistilGPT-2 shape (GPT-2 with 6 layers): embedding, n_layer GPT2Blocks, head."""
    tf = import_transformers()
    if attn_implementation not in ("sdpa", "eager"):
        raise ValueError(f"attn_implementation must be 'sdpa' or 'eager', got {attn_implementation!r}")
    cfg = make_config(tf.GPT2Config, pretrained,
                      dict(vocab_size=vocab_size, n_layer=n_layer, n_embd=n_embd, n_head=n_head,
                           n_positions=n_positions),
                      config, dict(tie_word_embeddings=False, use_cache=False,
                                   _attn_implementation=attn_implementation))
    _check_io(cfg, vocab_size, seq_len, cfg.n_positions)
    return _gpt_blocks(tf.GPT2LMHeadModel(cfg), pretrained)


@register_model("gptneo", init=init_hf_block)
def gptneo_blocks(vocab_size: int, seq_len: int, num_layers: int = 12, hidden_size: int = 768,
                  num_heads: int = 12, max_position_embeddings: int = 2048,
                  window_size: int = 256, attention_types: Optional[list] = None,
                  pretrained: Optional[str] = None,
                  config: Optional[Dict[str, Any]] = None) -> List[nn.Module]:
    """GPT-Neo 125M shape: embedding, num_layers GPTNeoBlocks (global/local alternating), head.
    ``attention_types`` defaults to ``[[["global", "local"], num_layers // 2]]``."""
    tf = import_transformers()
    if attention_types is None:
        if num_layers % 2:
            raise ValueError(f"num_layers {num_layers} is odd: give attention_types")
        attention_types = [[["global", "local"], num_layers // 2]]
    cfg = make_config(tf.GPTNeoConfig, pretrained,
                      dict(vocab_size=vocab_size, num_layers=num_layers, hidden_size=hidden_size,
                           num_heads=num_heads, max_position_embeddings=max_position_embeddings,
                           window_size=window_size,
                           attention_types=[[list(t), int(n)] for t, n in attention_types]),
                      config, dict(tie_word_embeddings=False, use_cache=False,
                                   _attn_implementation="eager"))
    _check_io(cfg, vocab_size, seq_len, cfg.max_position_embeddings)
    return _gpt_blocks(tf.GPTNeoForCausalLM(cfg), pretrained)
