"""wav2vec2 (base shape) for classifying fixed-length clips: raw audio ``(B, num_samples)``
float -> logits ``(B, num_classes)``.

Blocks: each convolution of the feature encoder (the first one adds the channel axis), the
feature projection (its tuple output unwrapped), the positional convolution with the
encoder's LayerNorm (both live in ``Wav2Vec2Encoder.forward``, not in a layer, so they are a
block of their own), one block per encoder layer, and the head of
``Wav2Vec2ForSequenceClassification`` (projector, mean over time, classifier). The composition
equals ``Wav2Vec2ForSequenceClassification`` without an attention mask.

Randomness outside the blocks is off: ``layerdrop=0`` (it lives in the encoder's loop) and no
SpecAugment time/feature masking (``mask_time_prob=mask_feature_prob=0``, it lives in
``Wav2Vec2Model.forward``). Dropout inside the blocks stays.

Random init is ``Wav2Vec2PreTrainedModel._init_weights`` block by block. Its in-place init of
the positional convolution's weight does not reach the weight-norm parametrization
(``original0``/``original1``), so that block sets it explicitly to what ``_init_weights``
states: direction ``v ~ N(0, (2 / sqrt(kernel * in_channels))^2)``, magnitude ``g = |v|``
(so the weight is ``v``), bias 0.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from . import register_model
from .hf import HFBlock, import_transformers, init_hf_block, make_config

_BASE = "wav2vec2"


class W2VConv(HFBlock):
    def __init__(self, model, index: int, source):
        super().__init__(model.config, type(model),
                         {"conv": f"{_BASE}.feature_extractor.conv_layers.{index}"}, source)
        self.conv = model.wav2vec2.feature_extractor.conv_layers[index]
        self.first = index == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x[:, None] if self.first else x)


class W2VProjection(HFBlock):
    def __init__(self, model, source):
        super().__init__(model.config, type(model), {"proj": f"{_BASE}.feature_projection"}, source)
        self.proj = model.wav2vec2.feature_projection

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(features.transpose(1, 2))[0]


class W2VPositional(HFBlock):
    def __init__(self, model, source):
        enc = model.wav2vec2.encoder
        super().__init__(model.config, type(model), {
            "pos_conv_embed": f"{_BASE}.encoder.pos_conv_embed",
            "layer_norm": f"{_BASE}.encoder.layer_norm",
            "dropout": f"{_BASE}.encoder.dropout"}, source)
        self.pos_conv_embed, self.layer_norm, self.dropout = enc.pos_conv_embed, enc.layer_norm, enc.dropout

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.layer_norm(hidden + self.pos_conv_embed(hidden)))

    def extra_init(self) -> None:
        conv = self.pos_conv_embed.conv
        std = 2 * math.sqrt(1 / (conv.kernel_size[0] * conv.in_channels))
        v = conv.parametrizations.weight.original1
        v.normal_(0.0, std)
        conv.parametrizations.weight.original0.copy_(torch.norm_except_dim(v, 2, 2))
        nn.init.zeros_(conv.bias)


class W2VLayer(HFBlock):
    def __init__(self, model, index: int, source):
        super().__init__(model.config, type(model), {"layer": f"{_BASE}.encoder.layers.{index}"}, source)
        self.layer = model.wav2vec2.encoder.layers[index]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.layer(hidden, attention_mask=None)
        return out[0] if isinstance(out, tuple) else out


class W2VHead(HFBlock):
    def __init__(self, model, source):
        super().__init__(model.config, type(model), {"projector": "projector",
                                                     "classifier": "classifier"}, source)
        self.projector, self.classifier = model.projector, model.classifier

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.projector(hidden).mean(dim=1))


@register_model("wav2vec2", init=init_hf_block)
def wav2vec2_blocks(input_shape: List[int], num_classes: int, hidden_size: int = 768,
                    num_hidden_layers: int = 12, num_attention_heads: int = 12,
                    intermediate_size: int = 3072, attn_implementation: str = "sdpa",
                    pretrained: Optional[str] = None,
                    config: Optional[Dict[str, Any]] = None) -> List[nn.Module]:
    """wav2vec2-base: 7 feature convolutions, projection, positional conv, 12 layers, head."""
    tf = import_transformers()
    if len(input_shape) != 1:
        raise ValueError(f"wav2vec2 needs data.input_shape [num_samples], got {list(input_shape)}")
    if attn_implementation not in ("sdpa", "eager"):
        raise ValueError(f"attn_implementation must be 'sdpa' or 'eager', got {attn_implementation!r}")
    cfg = make_config(tf.Wav2Vec2Config, pretrained,
                      dict(vocab_size=32, hidden_size=hidden_size,
                           num_hidden_layers=num_hidden_layers,
                           num_attention_heads=num_attention_heads,
                           intermediate_size=intermediate_size),
                      config, dict(layerdrop=0.0, mask_time_prob=0.0, mask_feature_prob=0.0,
                                   num_labels=num_classes, use_weighted_layer_sum=False,
                                   add_adapter=False, do_stable_layer_norm=False,
                                   _attn_implementation=attn_implementation))
    if cfg.feat_extract_norm != "group":
        raise ValueError(f"feat_extract_norm {cfg.feat_extract_norm!r}: only 'group' (base) is built")
    model = tf.Wav2Vec2ForSequenceClassification(cfg)
    n_conv = len(model.wav2vec2.feature_extractor.conv_layers)
    length = int(input_shape[0])
    for k, s in zip(cfg.conv_kernel, cfg.conv_stride):
        length = (length - k) // s + 1
    if length < 1:
        raise ValueError(f"data.input_shape {list(input_shape)}: too few samples for the "
                         f"feature encoder (kernels {list(cfg.conv_kernel)})")
    return [*(W2VConv(model, i, pretrained) for i in range(n_conv)),
            W2VProjection(model, pretrained), W2VPositional(model, pretrained),
            *(W2VLayer(model, i, pretrained) for i in range(cfg.num_hidden_layers)),
            W2VHead(model, pretrained)]
