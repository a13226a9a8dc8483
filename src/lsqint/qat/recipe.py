"""The QAT recipe: what `lsqint qat` and `lsqint sweep` use for epochs, lr, weight decay, gradient
clipping and the residual stream's bits when the command line does not say, chosen by the lower
of the two bit widths.

Each row met its target on CIFAR-10 resnet20 against a 87.56 % float model, with distillation
from the float model, in one `lsqint sweep` with these defaults (docs/results.md,
docs/results/cifar10_resnet20_recipe): W8A8 -0.10, W4A4 -0.50, W3A3 -0.92, W2A2 -2.90 points.
The 3- and 2-bit rows start from the QAT checkpoint one bit up (progressive initialization,
`sweep`'s default); from the float model they were not measured."""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class Recipe:
    epochs: int
    lr: float
    weight_decay: float
    grad_clip: float | None  # total L2 norm of the gradients; None: no clipping
    residual_bits: int | None  # None: the residual stream at the activation bits


# Near-lossless bits: the float model barely moves; a small lr keeps it there (lr 0.01, clip 1,
# wd 5e-5 gave 87.40 % at W8A8 in 2 epochs against 87.46 % for this row).
_HIGH = Recipe(epochs=2, lr=0.001, weight_decay=5e-4, grad_clip=None, residual_bits=None)
# 4 bits: lr 0.01 is safe once each step's norm is bounded (without clipping 0.01 diverged).
_FOUR = Recipe(epochs=3, lr=0.01, weight_decay=5e-5, grad_clip=1.0, residual_bits=8)
# 3 bits: the gap to float closed with length (3 epochs: 86.14 %, 6: 86.80 %), not with the lr.
_THREE = Recipe(epochs=6, lr=0.03, weight_decay=5e-5, grad_clip=1.0, residual_bits=8)
# 2 bits: the collapse fix (clip 1, 8-bit residual stream) and the LSQ paper's 2-bit wd 1e-4.
# 10 epochs met the target once (84.60 %) and missed it once by 3 images (84.50 %): the issue's
# full budget of 15.
_TWO = Recipe(epochs=15, lr=0.03, weight_decay=1e-4, grad_clip=1.0, residual_bits=8)

# The fields a user may override from the command line: RunArgs has the same names.
RECIPE_FIELDS = tuple(f.name for f in fields(Recipe))


def recipe_for(w_bits: int, a_bits: int) -> Recipe:
    low = min(w_bits, a_bits)
    if low >= 6:
        return _HIGH
    if low >= 4:
        return _FOUR
    if low == 3:
        return _THREE
    return _TWO


def progressive_source(
    pair: tuple[int, int], finished: list[tuple[int, int]]
) -> tuple[int, int] | None:
    """The finished pair a pair's QAT starts from under progressive initialization: at most one
    bit above on each side and not the pair itself (APoT's 4 -> 3 -> 2), both sides one bit up
    preferred; None: start from the float model. Steps of one bit keep the starting weights on a
    grid close to the new one; W8A8 -> W4A4 would start from what is in effect the float model
    with another run's noise."""
    w, a = pair
    for candidate in ((w + 1, a + 1), (w + 1, a), (w, a + 1)):
        if candidate in finished:
            return candidate
    return None
