"""prepare_qat: fx tracing, BN folding, quantizer insertion; QuantConfig."""

from .config import QuantConfig
from .graph import UnsupportedOpError, node_kind
from .modules import QuantConv2d, QuantConvBn2d, QuantLinear
from .prepare import (
    calibrate_,
    fold_bn_into_conv,
    freeze_batchnorm_,
    prepare_qat,
    quantizers,
)

__all__ = [
    "QuantConfig",
    "QuantConv2d",
    "QuantConvBn2d",
    "QuantLinear",
    "UnsupportedOpError",
    "calibrate_",
    "fold_bn_into_conv",
    "freeze_batchnorm_",
    "node_kind",
    "prepare_qat",
    "quantizers",
]
