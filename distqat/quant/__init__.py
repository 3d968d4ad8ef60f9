"""Our own fake quantization (not torch.ao): the numbers, QAT layers, integer export, and
compression of what crosses the wire. See ``fake_quant``'s docstring for the arithmetic.

    prepare_qat(model, QATSpec(weight_bits=4, activation_bits=8))   # train as usual
    save_export("stage0.safetensors", model)                       # integers + scales
    load_into(float_model, "stage0.safetensors")                   # evaluation path
"""

from .export import (dequantize_state, export_state, load_export, load_into, pack_int,
                     read_export, save_export, unpack_int)
from .fake_quant import (FakeQuantizer, calculate_qparams, dequantize, fake_quantize,
                         lsq_grad_factor, lsq_quantize, qrange, quantize)
from .qat import (QATConv1d, QATConv2d, QATLinear, QATSpec, is_qat_layer, prepare_qat,
                  qat_layers, qat_param_groups, quantizable_layers, quantizers, refresh_qparams,
                  skip_first_last, strip_qat)
from .wire import Encoded, decode, encode, nbytes, roundtrip

__all__ = [
    # fake_quant
    "qrange", "calculate_qparams", "fake_quantize", "lsq_quantize", "lsq_grad_factor",
    "quantize", "dequantize", "FakeQuantizer",
    # qat
    "QATSpec", "prepare_qat", "strip_qat", "skip_first_last", "qat_layers", "qat_param_groups",
    "quantizable_layers", "quantizers", "refresh_qparams", "is_qat_layer", "QATLinear", "QATConv1d", "QATConv2d",
    # export
    "export_state", "save_export", "read_export", "dequantize_state", "load_export", "load_into",
    "pack_int", "unpack_int",
    # wire
    "Encoded", "encode", "decode", "nbytes", "roundtrip",
]
