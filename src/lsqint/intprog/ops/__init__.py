"""The op registry: ``OPS`` maps each op name to its class (schema, verify rule, reference).

Importing this package registers every op; a new op is one class in one of these modules (or a
new module imported here) plus its lowering in each backend's table and its tests.
"""

from . import layers, movement, pooling, rounding  # noqa: F401  (registers the ops)
from .base import OPS, Op, Unsupported, missing_lowerings
from .layers import conv_acc_bound
from .pooling import adaptive_lcm, adaptive_pool_matrix, adaptive_windows

__all__ = [
    "OPS",
    "Op",
    "Unsupported",
    "adaptive_lcm",
    "adaptive_pool_matrix",
    "adaptive_windows",
    "conv_acc_bound",
    "missing_lowerings",
]
