"""Our own fake quantization, QAT layer swapping, integer export and wire compression."""
from .fake_quant import (FakeQuantizer, calculate_qparams, dequantize, fake_quantize,
                         lsq_grad_factor, lsq_quantize, qrange, quantize)
