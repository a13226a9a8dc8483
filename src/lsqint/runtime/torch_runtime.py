"""The torch runtime: fast integer-exact execution on CPU and CUDA.

Codes travel between ops as float tensors holding small integers; accumulating ops run as float
convolutions only where exactness is proven from the bound ``verify`` recorded
(docs/design.md, section 5):

* every product x_q * w_q and every partial sum of a conv/linear/pool is an integer of magnitude at
  most ``acc_bound``; float32 represents every integer below 2^24 and float64 below 2^53, so a
  direct or GEMM-based float convolution computes the exact sum in ANY summation order when
  ``acc_bound < 2^24`` (float32) or ``< 2^53`` (float64);
* on CUDA, cuDNN may pick transform-based algorithms (Winograd, FFT) whose rounding is not the
  exact-sum argument above; there we always compute in float64 (error ~1e-16 relative, far
  below the 0.5 that ``round`` absorbs) and round before casting; TF32 is switched off for the
  call and restored afterwards;
* requantize, add and the input op run as two float32 ops and a floor where ``exact_float`` proves
  the result equal to the reference's for every input the op can see (per layer, at build time);
  elsewhere in int64 exactly like the reference. ``CompiledProgram.paths`` says which ran where.

``int8_gemm=True`` runs each conv/linear whose codes fit int8 as an integer GEMM instead:
im2col of the codes (shifted by 128 when they are unsigned 8-bit), ``torch._int_mm`` (int8 x int8
-> int32: cuBLASLt's int8 tensor cores on CUDA, a slow exact kernel on CPU), plus a per-channel
int32 offset (bias + 128 * sum of weights). Exact when every partial sum fits int32:
max|x'| * sum|w| < 2^31 per output channel, checked per layer; each device's kernel is also probed
once with the worst-case operands a saturating kernel would get wrong (``_int_mm_is_exact``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch.nn import functional as F

from ..errors import ExportError
from ..intprog.exact_float import add_plans, affine_step_plan, channel_plans
from ..intprog.fixedpoint import shift_round
from ..intprog.ops import Unsupported, adaptive_pool_matrix
from ..intprog.program import IntProgram, Node
from . import native

F32_EXACT = 1 << 24
F64_EXACT = 1 << 53
INT32_LIMIT = 1 << 31
_INT_MM_EXACT: dict[str, bool] = {}


def _ceil8(n: int) -> int:
    return -(-n // 8) * 8


def _int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (M, K) @ b (K, N) in int8 -> int32 with K and N multiples of 8; pads M past 16 (cuBLASLt's
    shape rules for ``torch._int_mm``)."""
    m = a.shape[0]
    if m <= 16:
        a = F.pad(a, (0, 0, 0, 17 - m))
    return torch._int_mm(a, b)[:m]


def _int_mm_is_exact(device: torch.device, k: int) -> bool:
    """Does this device's ``torch._int_mm`` sum K products of int8 exactly into int32? Probed with
    the operands that break kernels which add product pairs in 16 bits (AVX2's vpmaddubsw after a
    +128 shift: 255 * -128 * 2 < -2^15) or accumulate in anything narrower than int32."""
    key = f"{device}:{k}"
    if key not in _INT_MM_EXACT:
        kp = _ceil8(k)
        a = torch.tensor([[-128] * kp, [127] * kp, [-128, 127] * (kp // 2)], dtype=torch.int8)
        b = torch.tensor([[-128, 127, -128, 127, 1, -1, 0, 127]] * kp, dtype=torch.int8)
        b[1::2, 2] = 127  # alternating signs along K
        exact = a.to(torch.int64) @ b.to(torch.int64)
        try:
            got = _int_mm(a.to(device), b.to(device)).cpu().to(torch.int64)
            _INT_MM_EXACT[key] = bool(torch.equal(got, exact))
        except RuntimeError:  # no int8 GEMM for these shapes/layouts here: the float path runs
            _INT_MM_EXACT[key] = False
    return _INT_MM_EXACT[key]


def _float_dtype(bound: int, device: torch.device) -> torch.dtype:
    if device.type == "cpu" and bound < F32_EXACT:
        return torch.float32
    if bound < F64_EXACT:
        return torch.float64
    raise OverflowError(f"accumulator bound {bound} is beyond float64's exact range")


def _exact(acc: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A float accumulator that holds exact integers (see the module docstring)."""
    if device.type != "cpu":
        acc = torch.round(acc)  # absorbs transform-algorithm error (float64 only on CUDA)
    return acc


def _code_dtype(lo: int, hi: int) -> torch.dtype:
    """How the C kernels store codes in [lo, hi]: uint8 where they fit (the code itself), else
    float32 (exact below 2^24, checked by the callers)."""
    return torch.uint8 if 0 <= lo and hi <= 255 else torch.float32


class CompiledProgram:
    """A program with its parameters moved to ``device`` once, ready to run many batches."""

    def __init__(
        self,
        program: IntProgram,
        device: str | torch.device = "cpu",
        int8_gemm: bool = False,
        cpu_kernels: bool = True,
    ) -> None:
        self.program = program
        self.device = torch.device(device)
        self.int8_gemm = int8_gemm
        # The CPU fast path (runtime/native.py): oneDNN int8 convolutions where the CPU has VNNI,
        # C kernels for requantize and add where a C compiler exists.
        fast = self.device.type == "cpu" and cpu_kernels and not int8_gemm
        self.kernels = native.kernels() if fast else None
        self.onednn = fast and native.onednn_int8_available()
        self.producer = {n.output: n for n in program.nodes}
        self.readers: dict[str, int] = {}
        for n in program.nodes:
            for name in n.inputs:
                self.readers[name] = self.readers.get(name, 0) + 1
        # node name -> "float32" | "float64" | "int64" | "int8-gemm" | ...
        self.paths: dict[str, str] = {}
        self.steps: list[tuple[Node, Callable]] = [
            (node, self._build(node)) for node in program.nodes if node.op != "output"
        ]
        self.output = program.nodes[-1].inputs[0]
        # Tensors to drop after each step (their last reader): freed buffers are reused while
        # still in cache instead of every op touching fresh memory.
        last_reader = {name: i for i, (n, _) in enumerate(self.steps) for name in n.inputs}
        self.drop_after: list[list[str]] = [[] for _ in self.steps]
        for name, i in last_reader.items():
            if name != self.output:
                self.drop_after[i].append(name)
        # Batches run in chunks whose largest activation (as float32) stays near 4 MiB: between
        # the fast path's passes the data stays in cache (measured on resnet20, batch 256:
        # chunks of 64 images ran 1.3-1.7x faster than the whole batch at once).
        largest = max(int(np.prod(spec.shape)) for spec in program.tensors.values())
        self.chunk = max(1, (4 << 20) // (4 * largest)) if self.kernels is not None else None

    def _param(self, node: Node, key: str, dtype=torch.int64) -> torch.Tensor:
        return torch.as_tensor(np.asarray(node.params[key]), device=self.device).to(dtype)

    def _channel(self, values, ndim: int) -> torch.Tensor:
        t = torch.as_tensor(np.asarray(values), device=self.device)
        return t.view(1, -1, *([1] * (ndim - 2)))

    def _acc_bound(self, tensor: str) -> int:
        return int(self.producer[tensor].attrs["acc_bound"])

    def _build(self, node: Node) -> Callable:
        lower = LOWERINGS.get(node.op)
        if not callable(lower):
            why = lower.reason if isinstance(lower, Unsupported) else "not in its table"
            raise ExportError(f"node '{node.name}' ({node.op}): the torch runtime has no op: {why}")
        return lower(self, node)

    def _build_layer(self, node: Node) -> Callable:
        a = node.attrs
        dev = self.device
        gemm = self._build_int8_gemm(node) if self.int8_gemm else None
        if gemm is not None:
            self.paths[node.name] = "int8-gemm"
            return gemm
        conv = self._build_onednn_conv(node) if self.onednn else None
        if conv is not None:
            self.paths[node.name] = "onednn-int8"
            return conv
        dtype = _float_dtype(a["acc_bound"], dev)
        self.paths[node.name] = str(dtype).replace("torch.", "")
        weight = self._param(node, "weight", dtype)
        bias = self._param(node, "bias", dtype)
        if node.op == "conv2d":
            stride, padding, dilation, groups = (
                a["stride"],
                a["padding"],
                a["dilation"],
                a["groups"],
            )

            def run_conv(x):
                acc = F.conv2d(x.to(dtype), weight, bias, stride, padding, dilation, groups)
                return _exact(acc, dev)

            return run_conv

        def run_linear(x):
            return _exact(F.linear(x.to(dtype), weight, bias), dev)

        return run_linear

    def _build_concat(self, node: Node) -> Callable:
        a = node.attrs
        self.paths[node.name] = "int64"
        lo, hi, t, ms = a["lo"], a["hi"], a["shift"], a["m"]

        def run_concat(*xs):
            parts = [
                shift_round(x.to(torch.int64) * m, t).clamp_(lo, hi)
                for x, m in zip(xs, ms, strict=True)
            ]
            return torch.cat(parts, dim=1).to(torch.float32)

        return run_concat

    def _build_maxpool(self, node: Node) -> Callable:
        a = node.attrs

        def run_maxpool(x):
            # Max over codes is exact in float; F.max_pool2d pads with -inf (never wins).
            return F.max_pool2d(
                x.to(torch.float32),
                a["kernel"],
                a["stride"],
                a["padding"],
                a["dilation"],
                a["ceil_mode"],
            )

        return run_maxpool

    def _build_avgpool(self, node: Node) -> Callable:
        a = node.attrs
        dev = self.device
        dtype = _float_dtype(a["acc_bound"], dev)
        self.paths[node.name] = str(dtype).replace("torch.", "")

        def run_avgpool(x):
            total = F.avg_pool2d(
                x.to(dtype),
                a["kernel"],
                a["stride"],
                a["padding"],
                count_include_pad=True,
                divisor_override=1,
            )
            return _exact(total, dev)

        return run_avgpool

    def _build_mul(self, node: Node) -> Callable:
        a = node.attrs
        self.paths[node.name] = "int64"
        lo, hi, shift, m = a["lo"], a["hi"], a["shift"], a["m"]

        def run_mul(x_a, x_b):
            acc = x_a.to(torch.int64) * x_b.to(torch.int64) * m
            return shift_round(acc, shift).clamp_(lo, hi).to(torch.float32)

        return run_mul

    def _build_lut(self, node: Node) -> Callable:
        table = self._param(node, "table", torch.float32)
        offset = node.attrs["offset"]

        def run_lut(x):
            return table[x.to(torch.int64) - offset]

        return run_lut

    def _build_adaptive_avgpool(self, node: Node) -> Callable:
        a = node.attrs
        self.paths[node.name] = "float64"
        h, w = self.program.tensors[node.inputs[0]].shape[1:]
        matrix = adaptive_pool_matrix((h, w), a["out_size"], a["lcm"])
        pool = torch.as_tensor(matrix, device=self.device).to(torch.float64)
        oh, ow = a["out_size"]

        def run_adaptive(x):
            # Integer products and sums below 2^31 (acc_bound): exact in float64.
            n, c = x.shape[:2]
            flat = x.reshape(n, c, h * w).to(torch.float64)
            return (flat @ pool).reshape(n, c, oh, ow)

        return run_adaptive

    def _build_flatten(self, node: Node) -> Callable:
        return lambda x: x.reshape(x.shape[0], -1)

    def _build_reshape(self, node: Node) -> Callable:
        shape = node.attrs["shape"]
        return lambda x: x.reshape(x.shape[0], *shape)

    def _build_transpose(self, node: Node) -> Callable:
        perm = (0, *(p + 1 for p in node.attrs["perm"]))
        return lambda x: x.permute(perm)

    def _build_slice(self, node: Node) -> Callable:
        a = node.attrs
        axis, start, length = a["axis"] + 1, a["start"], a["end"] - a["start"]
        return lambda x: x.narrow(axis, start, length)

    def _build_int8_gemm(self, node: Node) -> Callable | None:
        """conv2d/linear as im2col + int8 GEMM (module docstring), or None where the codes do not
        fit int8, a partial sum could leave int32, the conv is grouped, or the kernel failed its
        probe."""
        a = node.attrs
        if node.op == "conv2d" and a["groups"] != 1:
            return None
        spec = self.program.tensors[node.inputs[0]]
        if -128 <= spec.qmin and spec.qmax <= 127:
            shift = 0
        elif 0 <= spec.qmin and spec.qmax <= 255:
            # Unsigned 8-bit codes: x' = x - 128 is int8; sum(x w) = sum(x' w) + 128 sum(w).
            shift = 128
        else:
            return None
        weight = np.asarray(node.params["weight"], np.int64)
        w = weight.reshape(weight.shape[0], -1)  # (O, K), K ordered (C, KH, KW) like im2col below
        if w.size == 0 or w.min() < -128 or w.max() > 127:
            return None
        offset = np.asarray(node.params["bias"], np.int64) + shift * w.sum(axis=1)
        x_absmax = max(abs(spec.qmin - shift), abs(spec.qmax - shift))
        partial = x_absmax * np.abs(w).sum(axis=1)
        if (
            int(partial.max()) >= INT32_LIMIT
            or int(np.abs(offset).max()) >= INT32_LIMIT
            or int(a["acc_bound"]) >= INT32_LIMIT
            or not _int_mm_is_exact(self.device, w.shape[1])
        ):
            return None
        out_ch, k = w.shape
        kp, op = _ceil8(k), _ceil8(out_ch)
        w_mat = torch.zeros((kp, op), dtype=torch.int8)
        w_mat[:k, :out_ch] = torch.as_tensor(w.T.copy())
        w_mat = w_mat.to(self.device)
        offset_t = torch.as_tensor(offset, dtype=torch.int32, device=self.device)
        # Exact integers below 2^24 travel as float32 like the float path's; else float64.
        out_dtype = torch.float32 if int(a["acc_bound"]) < F32_EXACT else torch.float64

        def gemm(cols: torch.Tensor) -> torch.Tensor:  # (M, K) int8 -> (M, O) exact, out_dtype
            cols = F.pad(cols, (0, kp - k)) if kp != k else cols
            return (_int_mm(cols, w_mat)[:, :out_ch] + offset_t).to(out_dtype)

        if node.op == "linear":

            def run_linear_int8(x):
                return gemm((x - shift).to(torch.int8))

            return run_linear_int8
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (
            weight.shape[2:],
            a["stride"],
            a["padding"],
            a["dilation"],
        )

        def run_conv_int8(x):
            n = x.shape[0]
            # Padding pads code 0, i.e. x' = -shift.
            x8 = F.pad((x - shift).to(torch.int8), (pw, pw, ph, ph), value=-shift)
            win = x8.unfold(2, (kh - 1) * dh + 1, sh).unfold(3, (kw - 1) * dw + 1, sw)
            win = win[..., ::dh, ::dw]  # (N, C, OH, OW, KH, KW)
            oh, ow = win.shape[2], win.shape[3]
            cols = win.permute(0, 2, 3, 1, 4, 5).reshape(n * oh * ow, k)
            acc = gemm(cols).view(n, oh, ow, out_ch)
            return acc.permute(0, 3, 1, 2)  # NCHW view of channels_last memory

        return run_conv_int8

    def _build_onednn_conv(self, node: Node) -> Callable | None:
        """conv2d as oneDNN's u8 x s8 -> int32 convolution with a float32 output (see
        runtime/native.py for why it is exact), or None where the codes do not fit uint8 (after
        a +128 zero point for signed codes) or the weights int8, a value could reach 2^24 or
        leave int32, or the layer fails its probe."""
        a = node.attrs
        if node.op != "conv2d":
            return None
        spec = self.program.tensors[node.inputs[0]]
        if 0 <= spec.qmin and spec.qmax <= 255:
            zp = 0
        elif -128 <= spec.qmin and spec.qmax <= 127:
            zp = 128  # x + 128 as uint8, with oneDNN's zero point 128: sum((x + 128 - 128) w)
        else:
            return None
        weight = np.asarray(node.params["weight"], np.int64)
        bias = np.asarray(node.params["bias"], np.int64)
        if weight.size == 0 or weight.min() < -128 or weight.max() > 127:
            return None
        if int(a["acc_bound"]) >= F32_EXACT:
            return None
        conv = self._onednn_conv(node, weight, bias, zp)
        return conv if conv is not None and self._probe_conv(node, conv) else None

    def _onednn_conv(self, node: Node, weight: np.ndarray, bias: np.ndarray, zp: int):
        """One oneDNN convolution of ``weight`` (int8 values) with ``node``'s geometry, or None
        where its int32 sums could overflow or oneDNN refuses it."""
        a = node.attrs
        flat = weight.reshape(weight.shape[0], -1)
        # oneDNN sums the stored uint8 values (up to 255) and subtracts zp * sum(w) in int32.
        stored = 255 * np.abs(flat).sum(axis=1) + zp * np.abs(flat.sum(axis=1)) + np.abs(bias)
        if int(stored.max()) >= INT32_LIMIT:
            return None
        stride, padding, dilation, groups = a["stride"], a["padding"], a["dilation"], a["groups"]
        out_ch = weight.shape[0]
        ones = torch.ones(out_ch, dtype=torch.float32)
        zeros = torch.zeros(out_ch, dtype=torch.int64)
        bias_f = torch.as_tensor(bias, dtype=torch.float32)
        try:
            packed = torch.ops.onednn.qconv_prepack(
                torch.as_tensor(weight, dtype=torch.int8),
                ones,
                1.0,
                zp,
                stride,
                padding,
                dilation,
                groups,
                None,
            )
        except RuntimeError:
            return None

        def run_conv_onednn(x):
            if x.dtype != torch.uint8:
                x = (x + zp).to(torch.uint8) if zp else x.to(torch.uint8)
            x = x.contiguous(memory_format=torch.channels_last)
            return torch.ops.onednn.qconv2d_pointwise(
                x, 1.0, zp, packed, ones, zeros, bias_f, stride, padding, dilation, groups,
                1.0, 0, torch.float32, "none", [], "",
            )  # fmt: skip

        return run_conv_onednn

    def _probe_conv(self, node: Node, conv: Callable) -> bool:
        """Does ``conv`` give the exact accumulators on this layer? Checked against the float64
        convolution (exact: bounds below 2^53) on random codes, the two constant extremes, and
        for each of the first 8 output channels the inputs that drive it to its largest and
        smallest values. A check, not a proof: it guards the arithmetic argument against a
        kernel that is wrong for this layer's shape."""
        a = node.attrs
        spec = self.program.tensors[node.inputs[0]]
        c, h, w = spec.shape
        g = torch.Generator().manual_seed(0)
        x = [torch.randint(spec.qmin, spec.qmax + 1, (2, c, h, w), generator=g)]
        x += [torch.full((1, c, h, w), spec.qmin), torch.full((1, c, h, w), spec.qmax)]
        weight = torch.as_tensor(np.asarray(node.params["weight"], np.int64))
        if a["groups"] == 1:
            # Channel o's largest and smallest sums: qmax where its weight (summed over the
            # kernel) is >= 0, resp. < 0, qmin elsewhere.
            sign = weight[:8].sum(dim=(2, 3))[:, :, None, None] >= 0
            x.append(torch.where(sign, spec.qmax, spec.qmin).expand(-1, c, h, w))
            x.append(torch.where(sign, spec.qmin, spec.qmax).expand(-1, c, h, w))
        x = torch.cat(x).to(torch.float32)
        bias = torch.as_tensor(np.asarray(node.params["bias"], np.int64)).to(torch.float64)
        exact = F.conv2d(
            x.to(torch.float64), weight.to(torch.float64), bias,
            a["stride"], a["padding"], a["dilation"], a["groups"],
        )  # fmt: skip
        try:
            got = conv(x)
        except RuntimeError:
            return False
        return got.dtype == torch.float32 and torch.equal(got.to(torch.float64), exact)

    def _affine_plans(self, node, ms, bs, ts, lo, hi, x_min, x_max, ndim):
        """Per-channel (M, C) tensors and their dtype for the first float dtype proven exact."""
        plan = channel_plans(ms, bs, ts, lo, hi, x_min, x_max)
        if plan is None:
            return None
        M, C, np_dtype = plan
        dtype = torch.float32 if np_dtype is np.float32 else torch.float64
        self.paths[node.name] = str(dtype).replace("torch.", "")
        return self._channel(M, ndim), self._channel(C, ndim), dtype

    def _build_affine(self, node: Node) -> Callable:
        """The input op (pixels) and the affine op (codes): one rule, x*a[c] + b[c] >> t."""
        a = node.attrs
        lo, hi = a["lo"], a["hi"]
        t = a["shift"]
        x = self.program.tensors[node.inputs[0]]
        ca, cb = node.params["a"], node.params["b"]
        # The affine op on codes (the input op's pixels are 3 channels: not worth a kernel).
        if self.kernels is not None and node.op == "affine" and t >= 1:
            ca64, cb64 = np.asarray(ca, np.int64), np.asarray(cb, np.int64)
            largest = max(abs(x.qmin), abs(x.qmax)) * int(np.abs(ca64).max())
            if (
                max(abs(x.qmin), abs(x.qmax), -lo, hi) < F32_EXACT
                and largest + int(np.abs(cb64).max()) + (1 << t) < native.INT64_SAFE
            ):
                self.paths[node.name] = "native"
                out = _code_dtype(lo, hi)
                ts = np.full(len(ca64), t, np.int64)
                return native.Requantize(self.kernels, ca64, ts, lo, hi, out, b=cb64)
        plan = self._affine_plans(node, ca, cb, [t] * len(ca), lo, hi, x.qmin, x.qmax, 4)
        if plan is not None:
            M, C, dtype = plan
            # Codes are float32 tensors here: work on a copy unless this op is their only reader
            # (the residual stream's codes feed an add as well).
            copy = self.readers.get(node.inputs[0], 0) != 1

            def run_affine_float(x):
                y = x.to(dtype, copy=copy)
                return y.mul_(M).add_(C).floor_().clamp_(lo, hi).to(torch.float32)

            return run_affine_float
        self.paths[node.name] = "int64"
        scale_a = self._channel(ca, 4)
        bias_b = self._channel(cb, 4)

        def run_affine(x):
            acc = x.to(torch.int64) * scale_a + bias_b
            return shift_round(acc, t).clamp_(lo, hi).to(torch.float32)

        return run_affine

    def _build_requantize(self, node: Node) -> Callable:
        lo, hi = node.attrs["lo"], node.attrs["hi"]
        m, t = node.params["m"], node.params["shift"]
        ndim = len(self.program.tensors[node.inputs[0]].shape) + 1
        bound = self._acc_bound(node.inputs[0])
        # Codes leave as uint8 or float32, exact below 2^24 (logits may need int64). The kernel
        # takes channels as the innermost dimension: (N, C) and channels-last (N, C, H, W).
        if (
            self.kernels is not None
            and ndim in (2, 4)
            and bound < F32_EXACT
            and max(-lo, hi) < F32_EXACT
        ):
            # Per-channel parameters, or one value for every channel.
            channels = self.program.tensors[node.inputs[0]].shape[0]
            ms, ts = (np.broadcast_to(np.asarray(v, np.int64), (channels,)) for v in (m, t))
            if (
                ts.min() >= 1
                and bound * int(np.abs(ms).max()) + (1 << int(ts.max())) < native.INT64_SAFE
            ):
                self.paths[node.name] = "native"
                out = _code_dtype(lo, hi)
                return native.Requantize(self.kernels, ms, ts, lo, hi, out)
        owned = self.readers.get(node.inputs[0], 0) == 1
        mixed = self._mixed_requantize(node, m, t, lo, hi, bound, ndim, owned)
        if mixed is not None:
            return mixed
        plan = self._affine_plans(node, m, np.zeros_like(m), t, lo, hi, -bound, bound, ndim)
        if plan is not None:
            M, C, dtype = plan
            # acc holds exact integers (below 2^24 where it is float32). Update it in place only
            # when this op is its sole reader.
            owned = self.readers.get(node.inputs[0], 0) == 1

            def run_requantize_float(acc):
                y = acc.to(dtype) if owned else acc.to(dtype, copy=True)
                return y.mul_(M).add_(C).floor_().clamp_(lo, hi).to(torch.float32)

            return run_requantize_float
        self.paths[node.name] = "int64"
        m_t = self._channel(m, ndim)
        t_t = self._channel(t, ndim)
        narrow = hi - lo <= 1 << 16

        def run_requantize(acc):
            y = shift_round(acc.to(torch.int64) * m_t, t_t).clamp_(lo, hi)
            return y.to(torch.float32) if narrow else y

        return run_requantize

    def _mixed_requantize(self, node, m, t, lo, hi, bound, ndim, owned) -> Callable | None:
        """float32 for the channels proven exact in float32, float64 for the rest (8-bit outputs
        often have a few channels whose steps sit too close to a half for float32)."""
        if bound >= F32_EXACT or len(m) < 2:
            return None
        plans32 = [
            affine_step_plan(int(mc), 0, int(tc), lo, hi, -bound, bound, np.float32)
            for mc, tc in zip(m, t, strict=True)
        ]
        failing = [c for c, plan in enumerate(plans32) if plan is None]
        if not failing or len(failing) > len(m) // 2:
            return None  # all float32 (the plain path), or too many for a partial fix-up
        plans64 = [
            affine_step_plan(int(m[c]), 0, int(t[c]), lo, hi, -bound, bound, np.float64)
            for c in failing
        ]
        if any(plan is None for plan in plans64):
            return None
        self.paths[node.name] = "float32+float64"
        # Failing channels get a neutral float32 plan; their values are overwritten below.
        M32 = self._channel(np.array([p[0] if p else 1 for p in plans32], np.float32), ndim)
        C32 = self._channel(np.array([p[1] if p else 0 for p in plans32], np.float32), ndim)
        M64 = self._channel(np.array([p[0] for p in plans64], np.float64), ndim)
        C64 = self._channel(np.array([p[1] for p in plans64], np.float64), ndim)
        index = torch.tensor(failing, device=self.device)

        def run_requantize_mixed(acc):
            fix = acc.index_select(1, index).to(torch.float64)
            fix = fix.mul_(M64).add_(C64).floor_().clamp_(lo, hi).to(torch.float32)
            y = acc.to(torch.float32) if owned else acc.to(torch.float32, copy=True)
            y = y.mul_(M32).add_(C32).floor_().clamp_(lo, hi)
            return y.index_copy_(1, index, fix)

        return run_requantize_mixed

    def _build_add(self, node: Node) -> Callable:
        a = node.attrs
        lo, hi, t = a["lo"], a["hi"], a["shift"]
        ranges = [(self.program.tensors[n].qmin, self.program.tensors[n].qmax) for n in node.inputs]
        if self.kernels is not None and t >= 1 and max(-lo, hi) < F32_EXACT:
            # Codes arrive as float32 (exact below 2^24) or uint8.
            widest = max(abs(q) for r in ranges for q in r)
            largest = sum(
                max(abs(q) for q in r) * abs(m)
                for r, m in zip(ranges, (a["m_a"], a["m_b"]), strict=True)
            )
            if widest < F32_EXACT and largest + (1 << t) < native.INT64_SAFE:
                self.paths[node.name] = "native"
                out = _code_dtype(lo, hi)
                return native.Add(self.kernels, a["m_a"], a["m_b"], t, lo, hi, out)
        plan = add_plans(a["m_a"], a["m_b"], t, lo, hi, *ranges)
        if plan is not None:
            dtype = torch.float32 if plan[3] is np.float32 else torch.float64
            self.paths[node.name] = str(dtype).replace("torch.", "")
            Ma, Mb, C = (float(v) for v in plan[:3])

            # Reuse an input's buffer when this add is its only reader (fresh buffers cost
            # page faults); x_b is usually the shortcut, which the next block reads too.
            owned_a = self.readers.get(node.inputs[0], 0) == 1

            def run_add_float(x_a, x_b):
                y = x_a.to(dtype, copy=not owned_a).mul_(Ma)
                y.add_(torch.mul(x_b.to(dtype), Mb)).add_(C).floor_().clamp_(lo, hi)
                return y.to(torch.float32)

            return run_add_float
        self.paths[node.name] = "int64"
        m_a, m_b = a["m_a"], a["m_b"]

        def run_add(x_a, x_b):
            acc = x_a.to(torch.int64) * m_a + x_b.to(torch.int64) * m_b
            return shift_round(acc, t).clamp_(lo, hi).to(torch.float32)

        return run_add

    @torch.no_grad()
    def __call__(self, images) -> np.ndarray:
        if not torch.is_tensor(images):
            images = np.ascontiguousarray(images)  # any numpy layout (negative strides too)
        x = torch.as_tensor(images).to(self.device)
        if x.shape[0] == 0:
            return np.zeros((0, self.program.num_classes()), np.int32)
        if x.dim() == 4:
            # NHWC is oneDNN's and cuDNN's native conv layout; every op here preserves it.
            x = x.contiguous(memory_format=torch.channels_last)
        if self.chunk is not None and x.shape[0] > self.chunk:
            parts = [self._forward(part) for part in x.split(self.chunk)]
            return np.concatenate(parts)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> np.ndarray:
        env = {"input": x}
        tf32 = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        reduced = torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction
        try:
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
            # Float convolution is exact in any summation order, not under Winograd or FFT
            # transforms: NNPACK (PyTorch's CPU choice when oneDNN is off, batch >= 16) and
            # cuDNN may pick those, so both are off here; what remains is oneDNN's direct and
            # GEMM convolutions on CPU, and im2col + GEMM on CUDA.
            with (
                torch.backends.nnpack.flags(enabled=False),
                torch.backends.cudnn.flags(enabled=False, allow_tf32=False),
            ):
                for (node, fn), dead in zip(self.steps, self.drop_after, strict=True):
                    env[node.output] = fn(*(env[name] for name in node.inputs))
                    for name in dead:
                        del env[name]
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
            torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = reduced
        return env[self.output].to(torch.int64).to(torch.int32).cpu().numpy()


# The torch runtime's lowering of each op of the registry (intprog.ops): a builder that returns
# the step's function, or Unsupported with the reason.
LOWERINGS: dict[str, Callable | Unsupported] = {
    "input": CompiledProgram._build_affine,
    "affine": CompiledProgram._build_affine,
    "conv2d": CompiledProgram._build_layer,
    "linear": CompiledProgram._build_layer,
    "requantize": CompiledProgram._build_requantize,
    "add": CompiledProgram._build_add,
    "concat": CompiledProgram._build_concat,
    "mul": CompiledProgram._build_mul,
    "lut": CompiledProgram._build_lut,
    "maxpool2d": CompiledProgram._build_maxpool,
    "avgpool2d": CompiledProgram._build_avgpool,
    "adaptive_avgpool2d": CompiledProgram._build_adaptive_avgpool,
    "flatten": CompiledProgram._build_flatten,
    "reshape": CompiledProgram._build_reshape,
    "transpose": CompiledProgram._build_transpose,
    "slice": CompiledProgram._build_slice,
    "output": Unsupported("computes nothing: the compiled program returns the logits it reads"),
}
