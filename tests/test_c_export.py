"""The generated C: float-free, arena plan sound, bit-exact on this host and on a Cortex-M4.

The host differential tests (every bit pair, both weight layouts, three models) run the ``c``
runtime through ``conftest.DEFAULT_RUNTIMES``; this file checks what is particular to C.
"""

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import assert_runtimes_agree, quantize, random_qat_program
from lsqint import QuantConfig
from lsqint.app.cli import main
from lsqint.app.evaluation import images_and_labels
from lsqint.data import load_data
from lsqint.export.c_code import (
    export_c,
    fused_adds,
    fused_requantizes,
    generate_c,
    plan_arena,
)
from lsqint.export.c_host import CompiledC
from lsqint.export.mcu import (
    build_firmware,
    link_firmware,
    missing_tools,
    node_instructions,
    program_macs,
    qemu_output,
    run_qemu,
)
from lsqint.intprog.artifact import load, save
from lsqint.models import Normalize
from lsqint.runtime import run
from lsqint.toolchain import c_compiler

RESULTS = Path("docs/results/cifar10_resnet20_lowbit")
needs_cc = pytest.mark.skipif(c_compiler() is None, reason="needs a C compiler")


@pytest.mark.parametrize("bits", [2, 3, 8])
def test_generated_code_has_no_float_no_malloc_and_only_integer_headers(bits):
    _, program, _ = random_qat_program("resnet20", QuantConfig(bits, bits), seed=bits)
    header, source, _ = generate_c(program, "net")
    for text in (header, source):
        code = re.sub(r"/\*.*?\*/", "", text, flags=re.S)  # the words in comments do not run
        assert not re.search(r"\b(float|double|malloc|calloc|free|math\.h)\b", code)
        assert set(re.findall(r"#include\s*[<\"]([^>\"]+)", code)) <= {
            "stdint.h",
            "string.h",
            "net.h",
            "arm_acle.h",  # the DSP kernels' integer intrinsics (SMLAD, SXTB16), Arm targets only
        }
    assert "int net_run(const uint8_t *pixels, int32_t *logits);" in header


def test_arena_plan_never_overlaps_two_live_tensors(monkeypatch):
    """Lifetimes modelled here independently: a tensor lives from its writer to its last reader;
    a conv/linear fused with its requantize stores no accumulator and writes the codes itself;
    fused with an add too, it stores no codes but writes the add's output, which shares the
    bytes of the add's other input when in place (then that input lives until the output's
    last reader)."""
    _, program, _ = random_qat_program("resnet20", QuantConfig(4, 4), seed=1)
    offsets, total = plan_arena(program)
    fused = fused_requantizes(program)
    adds = fused_adds(program)
    writer_of_codes = {req.output: layer for layer, req in fused.items()}
    for codes, f in adds.items():  # the add's output is written by the layer
        writer_of_codes[f.add.output] = writer_of_codes[codes]
    in_place = {f.add.output: f.other for f in adds.values() if f.in_place}

    def storage(name):  # an in-place output lives in its other input's bytes
        while name in in_place:
            name = in_place[name]
        return name

    index = {n.output: i for i, n in enumerate(program.nodes)}
    nodes = program.nodes
    live = {}
    for i, node in enumerate(nodes):
        if node.op != "output" and node.output not in fused and node.output not in adds:
            if node.output not in in_place:
                start = index[writer_of_codes[node.output]] if node.output in writer_of_codes else i
                live.setdefault(node.output, [start, i])
        for name in node.inputs:
            if storage(name) in live:
                live[storage(name)][1] = i
    flat = {n.output for n in nodes if n.op == "flatten"}
    sizes = {
        name: int(np.prod(program.tensors[name].shape))
        * {"uint8": 1, "int8": 1, "int32": 4}[program.tensors[name].dtype]
        for name in live
    }
    names = [n for n in live if n not in flat]
    for a in names:
        assert offsets[a] + sizes[a] <= total
        for b in names:
            if a < b and not (live[a][1] < live[b][0] or live[b][1] < live[a][0]):
                apart = offsets[a] + sizes[a] <= offsets[b] or offsets[b] + sizes[b] <= offsets[a]
                assert apart, (a, b)
    assert total < sum(sizes[n] for n in names)  # lifetimes let tensors share bytes
    # Every conv's accumulator is fused away (resnet20: each is read by one requantize only);
    # the logits' int32 requantize is not fused (it writes int32, not codes).
    convs = [n.output for n in nodes if n.op == "conv2d"]
    assert set(convs) <= set(fused) and not set(fused) & set(offsets)
    assert program.nodes[-2].op == "requantize" and program.nodes[-2].inputs[0] not in fused
    # every residual add is the epilogue of its block's second conv, its codes never stored
    assert len(adds) == sum(n.op == "add" for n in nodes) == 9
    assert not set(adds) & set(offsets)
    assert in_place and all(offsets[y] == offsets[storage(y)] for y in in_place)
    # and the peak shrinks: a block's add output no longer needs bytes of its own
    monkeypatch.setattr("lsqint.export.c_code.fused_adds", lambda program: {})
    assert plan_arena(program)[1] > total


@needs_cc
def test_cli_export_c_writes_a_compilable_pair(tmp_path, capsys):
    _, program, images = random_qat_program("digits_cnn", QuantConfig(4, 4), seed=3, batch=4)
    save(program, tmp_path / "p.intprog.safetensors")
    code = main(
        [
            "export",
            "--program",
            str(tmp_path / "p.intprog.safetensors"),
            "--format",
            "c",
            "--out",
            str(tmp_path / "c"),
            "--name",
            "digits",
        ]
    )
    assert code == 0
    assert (tmp_path / "c" / "digits.h").is_file() and (tmp_path / "c" / "digits.c").is_file()
    assert "RAM" in capsys.readouterr().out
    # The program the files came from runs exactly through the c runtime too.
    assert np.array_equal(run(program, images.numpy(), runtime="c"), run(program, images.numpy()))


def test_cli_export_c_without_out_is_a_one_line_error(tmp_path, capsys):
    _, program, _ = random_qat_program("digits_cnn", QuantConfig(4, 4), seed=3)
    save(program, tmp_path / "p.intprog.safetensors")
    code = main(["export", "--program", str(tmp_path / "p.intprog.safetensors"), "--format", "c"])
    assert code == 2
    assert "--out" in capsys.readouterr().err


@needs_cc
def test_sizes_reported_match_packed_weights(tmp_path):
    _, program, _ = random_qat_program("resnet20", QuantConfig(2, 2), seed=4)
    info = export_c(program, tmp_path, "r20")
    _, _, again = generate_c(program, "r20")
    assert info.weight_bytes == again.weight_bytes
    # 2-bit weights take about a quarter of the int8 layout (the 8-bit first/last layers and the
    # int32 biases and multipliers are the same in both).
    assert info.weight_bytes < 0.4 * info.int8_weight_bytes
    # A stage-1 conv's input and output codes live at once; its int32 accumulator is never
    # stored (fused with the requantize), so the arena is under one such accumulator.
    assert 2 * 16 * 32 * 32 <= info.arena_bytes < 16 * 32 * 32 * 4


needs_arm = pytest.mark.skipif(
    bool(missing_tools()), reason="needs gcc-arm-none-eabi, libnewlib-arm-none-eabi, qemu"
)


# The committed resnet20 and ResNet-8 programs (50-330 KiB each; mobilenet_v2's, ~2 MB of
# weights as C array text, would add minutes of gcc to the default run).
PROGRAMS = sorted(
    [
        *Path(__file__).parents[1].glob("docs/results/cifar10_resnet20_*/*.intprog.safetensors"),
        *Path(__file__)
        .parents[1]
        .glob("docs/results/cifar10_mlperf_resnet8/*.intprog.safetensors"),
    ]
)


@needs_cc
@pytest.mark.parametrize("path", PROGRAMS, ids=[p.stem for p in PROGRAMS])
def test_committed_cifar10_programs_are_exact_in_c(path):
    program = load(path)
    images = np.random.default_rng(0).integers(0, 256, (4, 3, 32, 32), dtype=np.uint8)
    assert np.array_equal(run(program, images, runtime="c"), run(program, images))


@pytest.mark.mcu
@needs_arm
@pytest.mark.parametrize("bits", [(2, 2), (8, 8)])
def test_cortex_m4_digits_program_on_real_images_equals_reference(tmp_path, bits):
    """Cross-compiled for a Cortex-M4 (soft float ABI, -Os), run on qemu's mps2-an386, fed
    images of the embedded digits data."""
    _, program, _ = random_qat_program("digits_cnn", QuantConfig(*bits), seed=11)
    images, _ = images_and_labels(load_data("digits", None).val, 6)
    firmware = build_firmware(program, images.numpy(), tmp_path)
    assert np.array_equal(run_qemu(firmware, timeout=300), run(program, images.numpy()))
    assert firmware.bss_bytes >= generate_c(program)[2].arena_bytes


@pytest.mark.mcu
@needs_arm
@pytest.mark.parametrize("folder", [RESULTS, Path("docs/results/cifar10_mlperf_resnet8")])
def test_cortex_m4_committed_cifar10_program_equals_reference(tmp_path, folder):
    """The W2A2 CIFAR-10 resnet20 and ResNet-8 programs of docs/results on the emulated
    Cortex-M4 (CIFAR-10 images where ../shared has them, else random pixels)."""
    program = load(Path(__file__).parents[1] / folder / "w2a2.intprog.safetensors")
    try:
        images = images_and_labels(load_data("cifar10", "../shared/data/cifar10").val, 2)[0]
        images = images.numpy()
    except (FileNotFoundError, ValueError):
        images = np.random.default_rng(0).integers(0, 256, (2, 3, 32, 32), dtype=np.uint8)
    firmware = build_firmware(program, images, tmp_path)
    assert np.array_equal(run_qemu(firmware, timeout=300), run(program, images))


@pytest.mark.mcu
@needs_arm
def test_cortex_m4_instruction_count_is_repeatable_and_bounded_by_the_macs(tmp_path):
    """run_qemu(count=True): qemu's instruction-counted clock read around each inference. The
    same image twice costs the same count (to one counter tick); no instruction does more than
    two multiply-accumulates (SMLAD); -O2 executes fewer instructions than -Os."""
    _, program, images = random_qat_program("digits_cnn", QuantConfig(4, 4), seed=3)
    x = np.repeat(images.numpy()[:1], 2, axis=0)
    counts = {}
    for opt in ("-O2", "-Os"):
        firmware = build_firmware(program, x, tmp_path / opt, opt=opt)
        logits, counts[opt] = run_qemu(firmware, timeout=300, count=True)
        assert np.array_equal(logits, run(program, x))
        assert abs(counts[opt][0] - counts[opt][1]) <= 40  # one tick: the counter's phase
        assert counts[opt][0] >= program_macs(program) // 2
    assert counts["-O2"][0] < counts["-Os"][0]
    # -DLQ_PROFILE: each node's count; together they are the inference (the hook's calls add
    # a few instructions per node, the counter's phase up to a tick per node)
    profiled = build_firmware(program, x, tmp_path / "profile", opt="-O2", profile=True)
    per_node = node_instructions(profiled)
    assert per_node.shape == (len(program.nodes),)
    assert abs(per_node.sum() - counts["-O2"][0]) <= 60 * len(program.nodes)
    layers = [i for i, node in enumerate(program.nodes) if node.op in ("conv2d", "linear")]
    assert per_node[layers].sum() > 0.5 * per_node.sum()


@pytest.mark.mcu
@needs_arm
def test_cortex_m4_dsp_kernels_equal_the_reference_at_every_bit_pair(tmp_path):
    """The Cortex-M4 build takes the Arm DSP extension's conv/linear kernel (SMLAD on int16
    pairs, int8 weights): == the reference at every weight/activation pair 2-8 (square and
    mixed), per channel and per tensor, and on odd geometry (dilation, stride 3, asymmetric
    kernels and padding, grouped and depthwise convs, a linear layer); the portable kernels,
    built for the same core with -DLQ_PORTABLE, agree too."""
    cases = [
        ("digits_cnn", QuantConfig(w, a, per_channel=(w + a) % 4 == 0), w * 10 + a)
        for w, a in [(2, 2), (3, 3), (4, 4), (5, 5), (6, 6), (7, 7), (8, 8), (2, 8), (8, 3)]
    ]
    cases.append(("mlperf_resnet8", QuantConfig(4, 4), 7))
    for index, (name, config, seed) in enumerate(cases):
        _, program, images = random_qat_program(name, config, seed=seed, batch=3)
        firmware = build_firmware(program, images.numpy(), tmp_path / f"case{index}", opt="-O2")
        assert np.array_equal(run_qemu(firmware, timeout=300), run(program, images.numpy())), (
            name,
            config,
        )
    for bits in [(2, 3), (8, 8)]:
        torch.manual_seed(bits[0])
        images = torch.randint(0, 256, (3, 3, 17, 21), dtype=torch.uint8)
        _, program = quantize(OddGeometry().eval(), QuantConfig(*bits), images)
        expected = run(program, images.numpy())
        for portable in (False, True):
            out = tmp_path / f"odd{bits}{portable}"
            firmware = build_firmware(program, images.numpy(), out, opt="-O2", portable=portable)
            assert np.array_equal(run_qemu(firmware, timeout=300), expected), (bits, portable)


def _c_int32(v: int) -> str:
    return "(-2147483647 - 1)" if v == -(2**31) else str(v)


@pytest.mark.mcu
@needs_arm
def test_dsp_requantize_in_32_bit_steps_equals_the_rule(tmp_path):
    """The DSP path's fused requantize (lq_requant32: the high word of acc * m, then a 32-bit
    rounding shift when t > 32; lq_round_clamp when t <= 32) == clamp((acc * m + 2^(t-1)) >>
    t, lo, hi) computed with Python integers, on the Cortex-M4: every shift 1..62, the extreme
    accumulators and multipliers, random ones, signed and unsigned code ranges."""
    from lsqint.export.c_code import _HELPERS

    rng = np.random.default_rng(5)
    edges = [-(2**31), -(2**31) + 1, -(2**30), -1, 0, 1, 2**30, 2**31 - 1]
    cases = []
    for t in range(1, 63):
        for acc in edges + [int(v) for v in rng.integers(-(2**31), 2**31, 6)]:
            m = int(rng.choice([2**30, 2**31 - 1, int(rng.integers(2**30, 2**31))]))
            lo, hi = [(0, 255), (-128, 127), (0, 3), (-2, 1)][len(cases) % 4]
            cases.append((acc, m, t, lo, hi))
    table = ",\n".join(f"{{{_c_int32(a)}, {m}, {t}, {lo}, {hi}}}" for a, m, t, lo, hi in cases)
    main_c = tmp_path / "main.c"
    main_c.write_text(
        "#include <stdint.h>\n#include <stdio.h>\n#include <string.h>\n#define LQ_DSP 1\n"
        + _HELPERS
        + "static const struct { int32_t acc, m; int t; int32_t lo, hi; } cases[] = {\n"
        + table
        + "};\nvoid SystemInit(void) {}\nint main(void)\n{\n    unsigned i;\n"
        "    for (i = 0; i < sizeof cases / sizeof cases[0]; i++)\n"
        '        printf("%ld\\n", (long)LQ_REQUANT(cases[i].acc, cases[i].m, cases[i].t,'
        " cases[i].lo, cases[i].hi));\n    return 0;\n}\n"
    )
    firmware = link_firmware([main_c], tmp_path / "requant.elf", opt="-O2")
    got = [int(line) for line in qemu_output(firmware, timeout=300).split()]
    expected = [min(max((a * m + (1 << (t - 1))) >> t, lo), hi) for a, m, t, lo, hi in cases]
    assert got == expected


def _printed_on_m4(tmp_path, body: str, loops: str) -> list[int]:
    """The integers a firmware prints on qemu's Cortex-M4: the DSP path's helpers (_HELPERS:
    lq_smmla, lq_clamp32, ...), then ``body`` (tables, kernels), then ``loops`` inside main
    (with an ``unsigned i``)."""
    from lsqint.export.c_code import _HELPERS

    main_c = tmp_path / "main.c"
    main_c.write_text(
        "#include <stdint.h>\n#include <stdio.h>\n#include <string.h>\n#include <arm_acle.h>\n"
        "#define LQ_DSP 1\n"
        + _HELPERS
        + body
        + "void SystemInit(void) {}\nint main(void)\n{\n    unsigned i;\n"
        + loops
        + "    return 0;\n}\n"
    )
    firmware = link_firmware([main_c], tmp_path / "main.elf", opt="-O2")
    return [int(line) for line in qemu_output(firmware, timeout=300).split()]


@pytest.mark.mcu
@needs_arm
def test_dsp_add_in_32_bit_words_equals_the_rule(tmp_path):
    """The DSP path's residual add (lq_add_hi, with add_table's constants: codes times 2^k,
    the high word of SMULL + SMLAL, one rounding shift, USAT/SSAT or constant clamps) ==
    clamp((a m_a + b m_b + 2^(shift-1)) >> shift, lo, hi) with Python integers, on the
    Cortex-M4: every shift add_table takes (10..62 for 8-bit codes) with the largest
    multipliers it accepts, extreme and random int8/uint8 codes, saturation and clamp ranges.
    add_table refuses what would overflow."""
    from lsqint.export.c_dsp import DSP_KERNELS, add_table, saturation

    assert add_table({"m_a": 2**31, "m_b": 1, "shift": 40}, 128, 255) is None  # |m| >= 2^31
    assert add_table({"m_a": 2**31 - 1, "m_b": 2**31 - 1, "shift": 1}, 128, 255) is None
    rng = np.random.default_rng(9)
    ranges = [(0, 255), (-128, 127), (0, 3), (-5, 90)]
    cases = {r: [] for r in ranges}
    for shift in range(1, 63):
        for i in range(8):
            a, b = int(rng.integers(-128, 128)), int(rng.integers(0, 256))
            if i % 3 == 0:
                a, b = int(rng.choice([-128, 127])), int(rng.choice([0, 255]))
            ma, mb = 2**31 - 1, 2**31 - 1  # halve until add_table takes them
            while ma and add_table({"m_a": ma, "m_b": mb, "shift": shift}, 128, 255) is None:
                ma, mb = ma // 2, mb // 2
            if ma == 0:  # 255 * 2^(33 - shift) >= 2^31: this shift takes the int64 kernel
                assert shift < 10
                continue
            ma, mb = (int(rng.integers(ma // 2, ma + 1)) * int(rng.choice([-1, 1])) for _ in "ab")
            table = add_table({"m_a": ma, "m_b": mb, "shift": shift}, 128, 255)
            assert table is not None
            cases[ranges[(shift + i) % 4]].append((a, b, ma, mb, shift, table))
    body, expected = "", []
    for n, (lo, hi) in enumerate(ranges):
        name, expr = saturation(lo, hi, "(h + rnd) >> sh")
        kernel = DSP_KERNELS["add_hi"].replace("{SATN}", name).replace("{SAT}", expr)
        for key, ctype in (("A", "int8_t"), ("B", "uint8_t"), ("Y", "int32_t")):
            kernel = kernel.replace("{" + key + "N}", key.lower()).replace("{" + key + "}", ctype)
        body += kernel
        rows = ",\n".join(
            "{" + ", ".join(_c_int32(v) for v in (a, b, *table)) + "}"
            for a, b, _, _, _, table in cases[(lo, hi)]
        )
        body += f"static const int32_t cases{n}[][7] = {{\n{rows}}};\n"
        expected += [
            min(max((a * ma + b * mb + (1 << (t - 1))) >> t, lo), hi)
            for a, b, ma, mb, t, _ in cases[(lo, hi)]
        ]
    loops = "".join(
        f"    for (i = 0; i < sizeof cases{n} / sizeof cases{n}[0]; i++) {{\n"
        f"        const int32_t *c = cases{n}[i];\n"
        "        int8_t a = (int8_t)c[0]; uint8_t b = (uint8_t)c[1]; int32_t y;\n"
        f"        lq_add_hi_a_b_y_{saturation(lo, hi)[0]}(&a, &b, 1, c[2], c[3], c[4], c[5],"
        " (int)c[6], &y);\n"
        '        printf("%ld\\n", (long)y);\n    }\n'
        for n, (lo, hi) in enumerate(ranges)
    )
    assert _printed_on_m4(tmp_path, body, loops) == expected


@pytest.mark.mcu
@needs_arm
def test_dsp_fused_requantize_table_equals_the_rule(tmp_path):
    """The DSP kernels' fused requantize (requant_table's {m, rnd, sh} and kk = 2^k, LQ_RQ:
    SMMLA then one arithmetic shift, then USAT/SSAT or a clamp) == clamp((acc m + 2^(t-1))
    >> t, lo, hi) with Python integers on the Cortex-M4: every shift 1..62, accumulators at
    +-acc_bound and random inside it, the largest bound requant_table accepts for the shift,
    per-channel shifts mixing small and large; requant_table refuses a bound that 2^k would
    carry out of int32, and shifts that would pass 62."""
    from lsqint.export.c_dsp import requant_table, saturation

    assert requant_table(np.array([2**30]), np.array([20]), 1, 2**20) is None  # 2^33 acc
    assert requant_table(np.array([2**30, 2**30]), np.array([20, 60]), 2, 100) is None
    rng = np.random.default_rng(11)
    ranges = [(0, 255), (-128, 127), (0, 3), (-2, 1), (-7, 200)]
    rows, expected = {r: [] for r in ranges}, {r: [] for r in ranges}
    for t_min in range(1, 63):
        k = max(0, 33 - t_min)  # requant_table's: every t + k >= 33
        if k > 30:  # kk = 2^k would not fit int32: the int64 rule (lq_requant32) takes these
            assert requant_table(np.array([2**30]), np.array([t_min]), 1, 0) is None
            continue
        t = np.array([t_min, int(rng.integers(t_min, 63 - k))])
        m = rng.integers(2**30, 2**31, 2)
        bound = (2**31 - 1) >> k  # the largest it accepts
        assert requant_table(m, t, 2, bound + 1) is None
        q, kk = requant_table(m, t, 2, bound)
        assert kk == 2**k
        for acc in [-bound, bound, 0, -1, *(int(v) for v in rng.integers(-bound, bound + 1, 4))]:
            for ch in (0, 1):
                lo, hi = ranges[(t_min + ch + acc % 5) % len(ranges)]
                rows[(lo, hi)].append((acc, *q[ch], kk))
                mc, tc = int(m[ch]), int(t[ch])
                expected[(lo, hi)].append(min(max((acc * mc + (1 << (tc - 1))) >> tc, lo), hi))
    body, loops = "", ""
    for lo, hi in ranges:
        name, expr = saturation(lo, hi, "LQ_RQ(c[0], c + 1, c[4])")
        table = ",\n".join(
            "{" + ", ".join(_c_int32(int(v)) for v in r) + "}" for r in rows[(lo, hi)]
        )
        body += f"static const int32_t cases_{name}[][5] = {{\n{table}}};\n"
        loops += (
            f"    for (i = 0; i < sizeof cases_{name} / sizeof cases_{name}[0]; i++) {{\n"
            f"        const int32_t *c = cases_{name}[i];\n"
            f'        printf("%ld\\n", (long)({expr}));\n    }}\n'
        )
    assert _printed_on_m4(tmp_path, body, loops) == [v for r in ranges for v in expected[r]]


def test_add_table_of_every_result_is_the_reference():
    """add_lut: every pair of codes' result by the add's reference rule, indexed as the C
    kernel reads it; none beyond ADD_LUT_MAX entries."""
    from lsqint.export.c_dsp import ADD_LUT_MAX, add_lut
    from lsqint.intprog.ops import OPS
    from lsqint.intprog.program import Node, TensorSpec

    attrs = {"m_a": 1503238554, "m_b": -1181116006, "shift": 31, "lo": -2, "hi": 1}
    node = Node("add", "a1", ["xa", "xb"], "y", attrs=attrs)
    xa = TensorSpec("xa", "int8", (4,), -8, 7)
    xb = TensorSpec("xb", "uint8", (4,), 0, 15)
    lut = add_lut(node, xa, xb)
    for a in range(-8, 8):
        for b in range(16):
            want = OPS["add"].reference(node, [np.array([a]), np.array([b])])[0]
            assert lut[(a - xa.qmin) * 16 + (b - xb.qmin)] == want
    assert lut.min() == -2 and lut.max() == 1
    wide = TensorSpec("xb", "uint8", (4,), 0, 255)
    assert 16 * 256 > ADD_LUT_MAX and add_lut(node, xa, wide) is None


def test_affine_table_of_every_result_is_the_reference():
    """affine_lut: per channel every 8-bit code's result by the affine's (and the input op's)
    reference rule, indexed as lq_affine_lut reads it; none for wide tables or outputs."""
    from lsqint.export.c_dsp import AFFINE_LUT_MAX, affine_lut
    from lsqint.intprog.ops import OPS
    from lsqint.intprog.program import Node, TensorSpec

    rng = np.random.default_rng(3)
    params = {"a": rng.integers(-(2**40), 2**40, 5), "b": rng.integers(-(2**45), 2**45, 5)}
    node = Node("affine", "f", ["x"], "y", attrs={"shift": 41, "lo": -2, "hi": 1}, params=params)
    x = TensorSpec("x", "int8", (5, 2, 2), -128, 127)
    lut = affine_lut(node, x, TensorSpec("y", "int8", (5, 2, 2), -2, 1))
    codes = np.arange(-128, 128)
    for c in range(5):
        image = np.zeros((1, 5, 256, 1), np.int64)
        image[0, c, :, 0] = codes
        want = OPS["affine"].reference(node, [image])[0, c, :, 0]
        assert np.array_equal(lut[c * 256 : (c + 1) * 256], want)
    assert len(set(lut.tolist())) > 1  # the table is not constant
    wide = TensorSpec("x", "int8", (AFFINE_LUT_MAX // 256 + 1, 2, 2), -128, 127)
    assert affine_lut(node, wide, TensorSpec("y", "int8", wide.shape, -2, 1)) is None
    assert affine_lut(node, x, TensorSpec("y", "int32", x.shape, -(2**20), 2**20)) is None


def _read_dsp_layout(flat, out, groups, kp):
    """The weights back as lq_dot2x2 reads them: per pair of channels of a conv group, per four
    codes, LDRD of (word a, word b); SXTB16 of a word is (bytes 0, 2) = codes (k, k+1),
    SXTB16 of it rotated by 8 is (bytes 1, 3) = codes (k+2, k+3)."""
    og = out // groups
    og2 = og + og % 2
    rows = np.zeros((groups * og2, kp), np.int64)
    words = flat.reshape(groups * og2 // 2, kp // 4, 2, 4)  # pair, group of 4, a/b, bytes
    for pair in range(words.shape[0]):
        for g4 in range(kp // 4):
            for ab in range(2):
                word = words[pair, g4, ab]
                codes = [word[0], word[2], word[1], word[3]]  # SXTB16, then SXTB16 ror 8
                rows[2 * pair + ab, 4 * g4 : 4 * g4 + 4] = codes
    return rows.reshape(groups, og2, kp)


@pytest.mark.parametrize("out,groups", [(2, 1), (3, 1), (6, 3), (4, 4)])
def test_dsp_weight_layout_pairs_codes_as_the_kernel_reads_them(out, groups):
    """dsp_weight_layout stores what lq_dot2x2 reads (``_read_dsp_layout``): every channel's
    codes in order, rows padded with zeros to a multiple of 4, an odd channel count per conv
    group completed by a zero channel."""
    from lsqint.export.c_dsp import dsp_weight_layout

    rng = np.random.default_rng(out * 10 + groups)
    weight = rng.integers(-128, 128, (out, 2, 3, 3)).astype(np.int8)  # K = 18 -> Kp = 20
    flat, kp = dsp_weight_layout(weight, groups)
    og = out // groups
    og2 = og + og % 2
    assert kp == 20 and flat.dtype == np.int8 and flat.size == groups * og2 * kp
    rows = _read_dsp_layout(flat, out, groups, kp)
    expected = np.zeros((groups, og2, kp), np.int64)
    expected[:, :og, :18] = weight.reshape(groups, og, 18)
    assert np.array_equal(rows, expected)


def test_missing_arm_tools_are_named(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda _tool: None)
    assert "qemu-system-arm" in missing_tools()


class OddGeometry(nn.Module):
    """Every convolution and pooling parameter away from its default: dilation, groups
    (depthwise), stride 3, asymmetric kernels and padding, ceil-mode max pooling, padded average
    pooling, a linear layer reading a flattened map."""

    def __init__(self):
        super().__init__()
        self.normalize = Normalize((0.4, 0.5, 0.6), (0.2, 0.25, 0.3))
        self.conv1 = nn.Conv2d(3, 8, (3, 5), stride=(1, 2), padding=(2, 1), dilation=(2, 1))
        self.conv2 = nn.Conv2d(8, 8, 3, stride=3, padding=1, groups=8)  # depthwise
        self.conv3 = nn.Conv2d(8, 6, 1, groups=2)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
        self.avg = nn.AvgPool2d(2, stride=1, padding=1)
        self.fc = nn.Linear(6 * 5 * 4, 5)

    def forward(self, x):
        x = torch.relu(self.conv1(self.normalize(x)))
        x = torch.relu(self.conv2(x))
        x = self.pool(self.conv3(x))
        return self.fc(torch.flatten(self.avg(x), 1))


@needs_cc
@pytest.mark.parametrize("bits", [(2, 3), (8, 8)])
def test_odd_geometry_is_exact_in_c(bits):
    torch.manual_seed(bits[0])
    model = OddGeometry().eval()
    images = torch.randint(0, 256, (3, 3, 17, 21), dtype=torch.uint8)
    qat, program = quantize(model, QuantConfig(*bits), images)
    assert {"maxpool2d", "avgpool2d", "linear"} <= {n.op for n in program.nodes}
    fresh = np.random.default_rng(1).integers(0, 256, (5, 3, 17, 21), dtype=np.uint8)
    for batch in (images.numpy(), fresh):
        assert_runtimes_agree(program, batch)


def _packed_chunk(u_words: np.ndarray, x_words: np.ndarray, top: int) -> int:
    """What lq_packed_dot computes for one chunk: the products of the words summed mod 2^32
    (MUL, MLA), then the bits from ``top`` up (ADD ..., LSR #top)."""
    acc = 0
    for u, x in zip(u_words.tolist(), x_words.tolist(), strict=True):
        acc = (acc + u * x) % 2**32
    return acc >> top


@pytest.mark.parametrize("w_bits,a_bits", [(2, 2), (3, 2), (2, 3), (3, 3), (4, 4), (5, 4), (8, 8)])
@pytest.mark.parametrize("v,f", [(4, 8), (3, 11)])
def test_packed_chunks_are_exact_within_their_bound_and_only_there(w_bits, a_bits, v, f):
    """The packed kernel's arithmetic (v codes of f bits per word, pack_weight_layout's weight
    words, activation words packed the same way): n products summed mod 2^32 hold the exact
    dot product in bits f(v-1)..31 for the longest n the bound allows, at the worst case
    (largest codes) and on random codes; one more product is wrong at the worst case (the
    bound is needed). pack_plan gives no plan where no packing is exact for one product (5-bit
    weights with 4-bit activations, 8-bit) and never a chunk beyond its packing's bound."""
    from lsqint.export.c_dsp import pack_chunk_max, pack_plan, pack_weight_layout

    w_lo, w_hi, x_hi = -(2 ** (w_bits - 1)), 2 ** (w_bits - 1) - 1, 2**a_bits - 1
    top = f * (v - 1)
    n_max = pack_chunk_max(v, f, x_hi * (w_hi - w_lo))
    corners = np.resize(np.array([w_lo, w_hi], np.int8), (64, 16, 3, 3))  # 64 channels
    plan = pack_plan(corners, 0, x_hi)
    if w_bits + a_bits >= 8:
        assert plan is None
    elif w_bits + a_bits <= 5:  # 2-bit codes: four per word, cheaper than SMLAD
        assert plan is not None and plan[0] == 4
    if plan is not None and plan[0] == v:
        assert 1 <= plan[1] <= n_max and plan[3] == w_lo
    if n_max < 1:
        return
    rng = np.random.default_rng(w_bits * 10 + a_bits)
    for n, expect_exact in [(n_max, True), (n_max + 1, False)]:
        worst = np.full((2, v * n, 1, 1), w_hi, np.int8)
        for weight, x in [
            (worst, np.full(v * n, x_hi, np.int64)),
            (
                rng.integers(w_lo, w_hi + 1, (2, v * n, 1, 1)).astype(np.int8),
                rng.integers(0, x_hi + 1, v * n),
            ),
        ]:
            words = pack_weight_layout(weight, 1, w_lo, v, v * n).reshape(n, 2)
            x_words = (x.reshape(n, v) << (f * np.arange(v))).sum(axis=1)
            for channel in range(2):
                exact = int(((weight[channel].ravel().astype(int) - w_lo) * x).sum())
                got = _packed_chunk(words[:, channel], x_words, top)
                if expect_exact:
                    assert got == exact, (n, channel)
                elif weight is worst:
                    assert got != exact, (n, channel)


@pytest.mark.mcu
@needs_arm
def test_cortex_m4_packed_kernels_are_taken_and_exact(tmp_path):
    """Low-bit layers take a packed kernel (CExport.dsp_kernels) and stay == the reference on
    the Cortex-M4: W2A2, W3A2 and W3A3, per channel and per tensor, ResNet-8 at W2A2, grouped
    convs with an odd channel count per group."""
    cases = [
        ("digits_cnn", QuantConfig(2, 2), 1),
        ("digits_cnn", QuantConfig(3, 2, per_channel=False), 2),
        ("digits_cnn", QuantConfig(3, 3, per_channel=False), 5),
        ("mlperf_resnet8", QuantConfig(2, 2), 3),
    ]
    programs = [random_qat_program(*case[:2], seed=case[2], batch=3)[1:] for case in cases]
    torch.manual_seed(6)
    images = torch.randint(0, 256, (3, 3, 15, 13), dtype=torch.uint8)
    programs.append((quantize(GroupedWide().eval(), QuantConfig(2, 2), images)[1], images))
    for index, (program, images) in enumerate(programs):
        firmware = build_firmware(program, images.numpy(), tmp_path / f"p{index}", opt="-O2")
        assert np.array_equal(run_qemu(firmware, timeout=300), run(program, images.numpy()))
        kernels = generate_c(program)[2].dsp_kernels
        assert any(k.startswith("dsp-pack") for k in kernels.values()), kernels
    grouped = generate_c(programs[-1][0])[2].dsp_kernels
    assert grouped["conv2"].startswith("dsp-pack") and grouped["conv3"].startswith("dsp-pack")


class TwoAdds(nn.Module):
    """Two residual adds: the first one's other input is read again after the layer (by conv3),
    so it cannot be overwritten; the second one's (the first add's output) can."""

    def __init__(self):
        super().__init__()
        self.normalize = Normalize((0.4, 0.5, 0.6), (0.2, 0.25, 0.3))
        self.conv0 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = torch.relu(self.conv0(self.normalize(x)))
        a = torch.relu(self.conv2(torch.relu(self.conv1(x))) + x)
        b = torch.relu(a + self.conv3(x))
        return self.fc(torch.flatten(self.pool(b), 1))


@pytest.mark.mcu
@needs_arm
@needs_cc
def test_residual_adds_fused_into_the_layer_in_place_only_where_safe(tmp_path, monkeypatch):
    """fused_adds: both adds become their layer's epilogue (the layer's codes are never
    stored); the first writes its own bytes because conv3 reads its other input afterwards,
    the second overwrites its other input in place. The programs stay == the reference in the
    host C runtime (portable epilogue) and on the Cortex-M4 (table at 2 bits, SMULL high word
    at 8 bits), and the arena is no larger than without the fusion."""
    torch.manual_seed(8)
    images = torch.randint(0, 256, (3, 3, 9, 11), dtype=torch.uint8)
    for bits in (2, 8):
        program = quantize(TwoAdds().eval(), QuantConfig(bits, bits), images)[1]
        adds = fused_adds(program)
        assert len(adds) == 2, adds
        by_layer = {}
        for codes, f in adds.items():
            writer = next(n for n in program.nodes if n.op == "requantize" and n.output == codes)
            conv = next(n for n in program.nodes if n.output == writer.inputs[0])
            by_layer[conv.name] = f.in_place
        assert by_layer == {"conv2": False, "conv3": True}, by_layer
        offsets, arena = plan_arena(program)
        assert not set(adds) & set(offsets)
        with monkeypatch.context() as patch:
            patch.setattr("lsqint.export.c_code.fused_adds", lambda program: {})
            assert plan_arena(program)[1] >= arena
        expected = run(program, images.numpy())
        assert np.array_equal(CompiledC(program)(images.numpy()), expected), bits
        firmware = build_firmware(program, images.numpy(), tmp_path / f"b{bits}", opt="-O2")
        assert np.array_equal(run_qemu(firmware, timeout=300), expected), bits
        source = generate_c(program)[1]
        assert ("_alut_" if bits == 2 else "_ahi_") in source and "_a64_" in source


class LateShortcut(nn.Module):
    """A block whose shortcut conv runs after the main path's last conv: the add can only be
    the shortcut's epilogue (the main path's codes exist by then), not the main path's."""

    def __init__(self):
        super().__init__()
        self.normalize = Normalize((0.4, 0.5, 0.6), (0.2, 0.25, 0.3))
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.shortcut = nn.Conv2d(3, 8, 1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.normalize(x)
        main = self.conv2(torch.relu(self.conv1(x)))
        side = self.shortcut(x)
        return self.fc(torch.flatten(torch.relu(main + side).mean((2, 3), keepdim=True), 1))


@needs_cc
def test_an_add_is_fused_only_into_the_layer_that_runs_after_its_other_input():
    """fused_adds picks the conv that runs second (its other input is ready), and the program
    stays == the reference in the host C runtime."""
    torch.manual_seed(9)
    images = torch.randint(0, 256, (3, 3, 7, 9), dtype=torch.uint8)
    program = quantize(LateShortcut().eval(), QuantConfig(4, 4), images)[1]
    adds = fused_adds(program)
    writers = {n.output: n for n in program.nodes}
    layers = [writers[writers[codes].inputs[0]].name for codes in adds]
    assert layers == ["shortcut"], layers
    assert np.array_equal(CompiledC(program)(images.numpy()), run(program, images.numpy()))


class GroupedWide(nn.Module):
    """Grouped convs with many channels per group (the packed kernels' channel pairs within a
    group, an odd count in one), stride 2, odd image sides."""

    def __init__(self):
        super().__init__()
        self.normalize = Normalize((0.4, 0.5, 0.6), (0.2, 0.25, 0.3))
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 66, 3, padding=1, groups=2)  # 33 channels per group
        self.conv3 = nn.Conv2d(66, 64, 3, stride=2, padding=1, groups=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = torch.relu(self.conv1(self.normalize(x)))
        x = torch.relu(self.conv2(x))
        x = torch.relu(self.conv3(x))
        return self.fc(torch.flatten(self.pool(x), 1))
