"""LSQ math: the fake-quant autograd function, the quantizer module, code ranges, step-size init."""

from .lsq import MIN_SCALE, LSQQuantizer, init_scale, lsq_fake_quant
from .ranges import MAX_BITS, MIN_BITS, check_bits, code_range

__all__ = [
    "LSQQuantizer",
    "MAX_BITS",
    "MIN_BITS",
    "MIN_SCALE",
    "check_bits",
    "code_range",
    "init_scale",
    "lsq_fake_quant",
]
