"""QuantConfig: what to quantize to how many bits. A frozen, validated dataclass."""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from ..errors import UsageError, UsageTypeError
from ..quant.lsq import SCALE_INITS
from ..quant.ranges import check_bits

_OVERRIDE_KEYS = ("weight_bits", "act_bits")


@dataclass(frozen=True)
class QuantConfig:
    """Bit widths for LSQ quantization-aware training.

    weight_bits, act_bits: bits of every conv/linear weight and every activation (2..8).
    per_channel: one weight step size per output channel (True) or per tensor (False).
    first_last_bits: bits of the first layer's weights and of the last layer's weights and input
        activation (the LSQ paper keeps them at 8); None = the same as the rest.
    input_bits: bits of the quantized network input (after normalization; signed).
    residual_bits: bits of the residual stream: activations that only residual adds read (a
        block's last conv or its shortcut conv, BN folded, before the add), and block outputs
        that a residual add and the next convs both read (the add reads them at residual_bits,
        the convs a requantization to act_bits: an integer ``affine`` op in the program). Every
        conv/linear layer's inputs and weights keep their low bit width; a 2-bit residual
        stream throws away most of what the blocks add to it. None = act_bits.
    scale_init: how step sizes start: ``"mse"`` (the step size with the smallest quantization
        error, the default) or ``"lsq"`` (the paper's ``2 mean|x| / sqrt(qmax)``, which collapses
        sparse ReLU outputs at 2 bits; see ``quant.lsq.init_scale``).
    overrides: module-name pattern (fnmatch, e.g. ``"layers.2.*"``) -> ``{"weight_bits": b,
        "act_bits": b}``; act_bits applies to the activation a matching layer produces.
        The last matching pattern wins.

    >>> QuantConfig(weight_bits=3, act_bits=3).weight_bits
    3
    """

    weight_bits: int = 4
    act_bits: int = 4
    per_channel: bool = True
    first_last_bits: int | None = 8
    input_bits: int = 8
    residual_bits: int | None = None
    scale_init: str = "mse"
    overrides: Mapping[str, Mapping[str, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_bits(self.weight_bits, "weight_bits")
        check_bits(self.act_bits, "act_bits")
        check_bits(self.input_bits, "input_bits")
        if self.first_last_bits is not None:
            check_bits(self.first_last_bits, "first_last_bits")
        if self.residual_bits is not None:
            check_bits(self.residual_bits, "residual_bits")
        if self.scale_init not in SCALE_INITS:
            raise UsageError(
                f"scale_init={self.scale_init!r} is unknown; use one of {', '.join(SCALE_INITS)}"
            )
        if not isinstance(self.per_channel, bool):
            raise UsageTypeError(f"per_channel must be True or False, got {self.per_channel!r}")
        if not isinstance(self.overrides, Mapping):
            raise UsageTypeError(
                "overrides must map a module-name pattern to {'weight_bits': b, 'act_bits': b}"
            )
        frozen = {}
        for pattern, spec in self.overrides.items():
            if not isinstance(spec, Mapping):
                raise UsageTypeError(
                    f"override {pattern!r}: expected a dict like {{'weight_bits': 3}}, got {spec!r}"
                )
            for key, bits in spec.items():
                if key not in _OVERRIDE_KEYS:
                    import difflib

                    close = difflib.get_close_matches(key, _OVERRIDE_KEYS, n=1)
                    hint = f"; did you mean {close[0]!r}?" if close else ""
                    raise UsageError(f"override {pattern!r}: unknown key {key!r}{hint}")
                check_bits(bits, f"overrides[{pattern!r}][{key!r}]")
            frozen[str(pattern)] = MappingProxyType(dict(spec))
        object.__setattr__(self, "overrides", MappingProxyType(frozen))

    def __deepcopy__(self, memo) -> QuantConfig:
        return self  # immutable all the way down (frozen, MappingProxyType overrides)

    def __copy__(self) -> QuantConfig:
        return self

    def __reduce__(self):
        return (QuantConfig.from_dict, (self.to_dict(),))

    def override_for(self, module_name: str, key: str) -> int | None:
        """Bits set for ``module_name`` by the last matching override pattern, or None."""
        found = None
        for pattern, spec in self.overrides.items():
            if key in spec and fnmatch.fnmatchcase(module_name, pattern):
                found = spec[key]
        return found

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["overrides"] = {k: dict(v) for k, v in self.overrides.items()}
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> QuantConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise UsageError(f"QuantConfig: unknown fields {sorted(unknown)}")
        return cls(**d)
