"""The C export: compiled with strict flags, it must predict exactly what torch predicts."""

from __future__ import annotations

import platform
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from common.bnn.model import BNN, BNNConfig
from common.edge.deploy import export_model, to_deployment
from common.errors import HyBNNError
from common.edge.export_c import (
    AVX2_FLAGS,
    FAST_FLAGS,
    HEADER_NAME,
    SOURCE_NAME,
    STRICT_FLAGS,
    build_kernel,
    find_c_compiler,
    generate_c,
)
from edge_models import harden, probe_codes, random_codes, torch_predictions, trained_bnn

CC = find_c_compiler()
pytestmark = pytest.mark.skipif(CC is None, reason="no C compiler (cc, gcc or clang) on PATH to build the C export")

PAPER = BNNConfig(in_bits=200, hidden=(128,), num_classes=2)
DEEP = BNNConfig(in_bits=203, hidden=(37, 70), num_classes=10)
FLAT = BNNConfig(in_bits=200, hidden=(), num_classes=3)
TINY = BNNConfig(in_bits=12, hidden=(5,), num_classes=4)  # no full input word, only a tail
WIDE = BNNConfig(in_bits=1100, hidden=(300,), num_classes=3)  # 35 and 10 words: counts of several plane groups


def _cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux), empty elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))


X86 = platform.machine() in ("x86_64", "AMD64")
CPU_FLAGS = _cpu_flags()
VECTOR_POPCOUNT_FLAGS = ("-std=c99", "-O3", "-march=x86-64-v4", "-mavx512vpopcntdq", "-Wall", "-Wextra", "-Werror")
"""AVX-512 with VPOPCNTDQ named explicitly, so that path is built wherever the CPU can run it."""
SSE_FLAGS = ("-std=c99", "-O3", "-march=x86-64-v2", "-Wall", "-Wextra", "-Werror")
"""x86-64 with SSSE3, SSE4.2 and POPCNT but no AVX: the 16-unit nibble tables."""

# (flags, the counting path the build must take: (HYBNN_VECTOR_POPCOUNT, HYBNN_NIBBLE_TABLES), None: the CPU's)
BUILDS = {
    "strict-portable": (STRICT_FLAGS, (0, 0)),
    "native": (FAST_FLAGS, None),
    "avx2": (AVX2_FLAGS, (0, 32)),
    "sse": (SSE_FLAGS, (0, 16)),
    "avx512-vpopcnt": (VECTOR_POPCOUNT_FLAGS, (1, 0)),
}
RUNNABLE = {
    "avx2": X86 and "avx2" in CPU_FLAGS,
    "sse": X86 and {"ssse3", "sse4_1", "sse4_2", "popcnt"} <= CPU_FLAGS,
    "avx512-vpopcnt": X86 and {"avx512f", "avx512vl", "avx512bw", "avx512dq", "avx512cd", "avx512_vpopcntdq"} <= CPU_FLAGS,
}


def _native_path() -> tuple[int, int]:
    """The counting path -march=native takes on this CPU."""
    if X86 and "avx512_vpopcntdq" in CPU_FLAGS:
        return 1, 0
    if X86 and "avx2" in CPU_FLAGS:
        return 0, 32
    return 0, 16 if X86 and "ssse3" in CPU_FLAGS else 0


def _build_params() -> list:
    return [pytest.param(name, marks=pytest.mark.skipif(not RUNNABLE.get(name, True),
                                                        reason=f"this CPU cannot run the {name} build"))
            for name in BUILDS]

DRIVER = r"""
#include <stdio.h>
#include "hybnn.h"

/* Reads codes of HYBNN_CODE_BYTES bytes from stdin, prints one class per line. */
int main(void)
{
    uint8_t code[HYBNN_CODE_BYTES];
    while (fread(code, 1, HYBNN_CODE_BYTES, stdin) == HYBNN_CODE_BYTES) {
        printf("%d\n", (int)hybnn_predict(code));
    }
    return 0;
}
"""


@pytest.fixture(scope="module", params=[PAPER, DEEP, FLAT, TINY, WIDE], ids=["paper", "deep", "flat", "tiny", "wide"])
def hard_model(request) -> BNN:
    return harden(trained_bnn(request.param, seed=21), seed=22)


def _codes(model: BNN, seed: int = 0, n_random: int = 3000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    nbytes = -(-model.config.in_bits // 8)
    return np.concatenate([
        random_codes(rng, n_random, model.config.in_bits),
        probe_codes(model, rng, per_unit=1),
        np.zeros((1, nbytes), np.uint8),  # every input bit -1
        _all_ones(model.config.in_bits),  # every input bit +1
    ])


def _all_ones(in_bits: int) -> np.ndarray:
    ones = np.full((1, -(-in_bits // 8)), 0xFF, np.uint8)
    if in_bits % 8:
        ones[:, -1] = (0xFF << (8 - in_bits % 8)) & 0xFF
    return ones


@pytest.mark.parametrize("build", _build_params())
def test_compiled_c_agrees_with_torch(tmp_path, hard_model: BNN, build: str) -> None:
    """Every counting path (carry-save adders, vector popcount, nibble tables), plain and vectorized builds."""
    deployed = to_deployment(hard_model)
    kernel = build_kernel(deployed, tmp_path, BUILDS[build][0])
    codes = _codes(hard_model, seed=23)
    want = torch_predictions(hard_model, codes)
    np.testing.assert_array_equal(kernel.predict(codes), want)
    one_by_one = [kernel.predict_one(np.ascontiguousarray(c)) for c in codes[:300]]
    np.testing.assert_array_equal(one_by_one, want[:300])
    assert len(np.unique(want)) > 1


@pytest.mark.parametrize("build", _build_params())
def test_each_build_takes_its_counting_path(tmp_path, build: str) -> None:
    """The vector popcount path exactly where the compiler targets VPOPCNTDQ, nibble tables on other
    x86 builds with AVX2 (32 units a lookup) or SSSE3 (16), the carry-save adders elsewhere."""
    flags, want = BUILDS[build]
    vector, nibble = _native_path() if want is None else want
    export_model(trained_bnn(TINY, seed=40), tmp_path, "c")
    macros = subprocess.run([CC, *flags, "-E", "-dM", str(tmp_path / SOURCE_NAME)],
                            capture_output=True, text=True, check=True).stdout.splitlines()
    assert f"#define HYBNN_VECTOR_POPCOUNT {vector}" in macros
    assert f"#define HYBNN_NIBBLE_TABLES {nibble}" in macros


def test_a_first_layer_too_wide_for_byte_lanes_has_no_nibble_tables(tmp_path) -> None:
    export_model(trained_bnn(WIDE, seed=45), tmp_path, "c")
    macros = subprocess.run([CC, *AVX2_FLAGS, "-E", "-dM", str(tmp_path / SOURCE_NAME)],
                            capture_output=True, text=True, check=True).stdout.splitlines()
    assert "#define HYBNN_NIBBLE_TABLES 0" in macros


def test_padding_bits_of_the_code_are_ignored(tmp_path) -> None:
    model = harden(trained_bnn(DEEP, seed=24), seed=25)
    kernel = build_kernel(to_deployment(model), tmp_path)
    codes = random_codes(np.random.default_rng(26), 500, DEEP.in_bits)
    dirty = codes.copy()
    dirty[:, -1] |= np.uint8(0xFF >> (DEEP.in_bits % 8))
    np.testing.assert_array_equal(kernel.predict(dirty), torch_predictions(model, codes))
    raw = np.empty(len(dirty), np.uint8)  # straight through the C entry point, no numpy masking
    kernel.lib.hybnn_predict_batch(dirty.ctypes.data, len(dirty), raw.ctypes.data)
    np.testing.assert_array_equal(raw, torch_predictions(model, codes))


def test_table_output_form_compiles_and_agrees(tmp_path) -> None:
    model = trained_bnn(BNNConfig(in_bits=64, hidden=(16,), num_classes=2), seed=27)
    with torch.no_grad():  # float32 ties near 1e8 force the rank table (see test_edge)
        model.out_bn.running_mean.zero_()
        model.out_bn.running_var.fill_(1.0)
        model.out_bn.weight.copy_(torch.tensor([1.0, 1.0000001]))
        model.out_bn.bias.copy_(torch.tensor([1e8, 1e8 + 8]))
    deployed = to_deployment(model)
    assert deployed.output.form == "table"
    kernel = build_kernel(deployed, tmp_path)
    codes = _codes(model, seed=28)
    np.testing.assert_array_equal(kernel.predict(codes), torch_predictions(model, codes))


def test_a_standalone_program_builds_and_runs(tmp_path) -> None:
    model = harden(trained_bnn(PAPER, seed=29), seed=30)
    paths = export_model(model, tmp_path, "c")
    assert [p.name for p in paths] == [HEADER_NAME, SOURCE_NAME]
    (tmp_path / "main.c").write_text(DRIVER)
    exe = tmp_path / "classify"
    subprocess.run([CC, *STRICT_FLAGS, "-o", str(exe), str(tmp_path / "main.c"), str(tmp_path / SOURCE_NAME)],
                   check=True, capture_output=True)
    codes = _codes(model, seed=31, n_random=1000)
    run = subprocess.run([str(exe)], input=codes.tobytes(), capture_output=True, check=True)
    got = np.array(run.stdout.split(), dtype=np.int64)
    np.testing.assert_array_equal(got, torch_predictions(model, codes))


def test_generated_code_needs_no_heap_floats_or_libraries(tmp_path) -> None:
    model = harden(trained_bnn(PAPER, seed=32), seed=33)
    header, source = (p.read_text() for p in export_model(model, tmp_path, "c"))
    code = re.sub(r"/\*.*?\*/", "", header + source, flags=re.S)
    # the intrinsics headers only where the compiler targets them
    intrinsics = re.findall(r"#(?:el)?if ([^\n]*)\n#define HYBNN_NIBBLE_TABLES \d+\n#include <(\w+\.h)>", code)
    assert intrinsics == [("!HYBNN_VECTOR_POPCOUNT && defined(__AVX2__)", "immintrin.h"),
                          ("!HYBNN_VECTOR_POPCOUNT && defined(__SSSE3__)", "tmmintrin.h")]
    assert re.findall(r"#include\s*[<\"]([^>\"]+)", code) == ["stdint.h", HEADER_NAME, "immintrin.h", "tmmintrin.h"]
    for word in ("float", "double", "malloc", "free", "static int32_t counter", "memcpy"):
        assert not re.search(rf"\b{word}\b", code), word
    # the contract is written down where a firmware author reads it
    assert "#define HYBNN_CODE_BYTES 25" in header and "most significant bit first" in header
    assert "uint8_t hybnn_predict(const uint8_t code[HYBNN_CODE_BYTES]);" in header
    # freestanding, and no call into any runtime library
    obj = tmp_path / "hybnn.o"
    subprocess.run([CC, *STRICT_FLAGS, "-ffreestanding", "-c", "-o", str(obj), str(tmp_path / SOURCE_NAME)],
                   check=True, capture_output=True)
    nm = shutil.which("nm")
    if nm:
        undefined = subprocess.run([nm, "-u", str(obj)], capture_output=True, text=True, check=True).stdout.split()
        assert undefined == [], undefined
        if X86:  # the nibble tables call nothing either
            subprocess.run([CC, *AVX2_FLAGS, "-c", "-o", str(obj), str(tmp_path / SOURCE_NAME)], check=True,
                           capture_output=True)
            undefined = subprocess.run([nm, "-u", str(obj)], capture_output=True, text=True, check=True).stdout.split()
            assert undefined == [], undefined


def test_model_bytes_are_counted_and_small(tmp_path) -> None:
    model = trained_bnn(PAPER, seed=34)
    deployed = to_deployment(model)
    _, _, model_bytes = generate_c(deployed)
    kernel = build_kernel(deployed, tmp_path)  # the source checks the count with sizeof at compile time
    assert kernel.model_bytes == model_bytes
    header, _, _ = generate_c(deployed)
    nibble_bytes = int(re.search(r"#define HYBNN_NIBBLE_MODEL_BYTES (\d+)", header).group(1))
    assert nibble_bytes == model_bytes + 2 * 25 * 128 + 128 - (4 * 6 + 1 + 2) * 128  # nibbles and limits, not words
    if RUNNABLE["avx2"]:
        assert build_kernel(deployed, tmp_path / "avx2", AVX2_FLAGS).model_bytes == nibble_bytes
    float_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert model_bytes * 25 <= float_bytes, (model_bytes, float_bytes)


def test_more_classes_than_a_byte_holds_are_refused() -> None:
    model = trained_bnn(BNNConfig(in_bits=8, hidden=(), num_classes=300), seed=35, samples=600)
    with pytest.raises(HyBNNError, match="at most 256"):
        generate_c(to_deployment(model))


# ---------------------------------------------------------------- real MNIST codes
@pytest.mark.parametrize("task_name", ["0v1", "2v3", "4v5", "6v7", "8v9", "all10"])
def test_whole_mnist_test_set_agrees_for_every_task(tmp_path, task_name: str, mnist_encoder) -> None:
    """numpy and C (strict flags, and -march=native: nibble tables or vector popcount on x86)
    give torch's predictions on the task's entire test set."""
    artifact, data_root = mnist_encoder
    from common.bnn.model import codes_to_inputs
    from common.edge.deploy import predict
    from common.encoder.features import load_codes
    from common.data.tasks import get_task, select_task
    from common.bnn.training import TrainConfig, fit, predict as torch_predict

    task = get_task(task_name)
    train_codes, train_labels = select_task(*load_codes(artifact, data_root, "train", progress=False), task)
    test_codes, _ = select_task(*load_codes(artifact, data_root, "test", progress=False), task)
    torch.set_num_threads(1)
    model = BNN(BNNConfig.for_task(artifact.config.latent_bits, task.num_classes))  # all10: 512 hidden
    x = codes_to_inputs(train_codes[:4000], artifact.config.latent_bits)
    fit(model, x, torch.from_numpy(train_labels[:4000]), TrainConfig(epochs=1, batch_size=128), progress=False)
    want = torch_predict(model, codes_to_inputs(test_codes, artifact.config.latent_bits)).numpy()
    deployed = to_deployment(model)
    np.testing.assert_array_equal(predict(deployed, test_codes), want)
    np.testing.assert_array_equal(build_kernel(deployed, tmp_path).predict(test_codes), want)
    np.testing.assert_array_equal(build_kernel(deployed, tmp_path / "native", FAST_FLAGS).predict(test_codes), want)


PROVENANCE_DRIVER = r"""
#include <stdio.h>
#include "hybnn.h"
static const char *const names[HYBNN_NUM_CLASSES] = HYBNN_CLASS_NAMES;
int main(void) {
    int i;
    printf("%s\n%s\n%s\n", HYBNN_ENCODER_SHA256, HYBNN_TASK, HYBNN_DATASET);
    for (i = 0; i < HYBNN_NUM_CLASSES; ++i) printf("%s\n", names[i]);
    return 0;
}
"""


def test_the_header_names_the_encoder_task_and_class_order_and_a_second_export_keeps_the_first(tmp_path):
    """Names with quotes, backslashes, a comment end, a '?' and non-ASCII reach C exactly."""
    from common.bnn.store import save_bnn
    from simulation.cli import main

    model = harden(trained_bnn(PAPER, seed=41), seed=42)
    names = ['say "hi"', "back\\slash */ ??= Ünïcode"]
    task = "odd\nname"
    save_bnn(model, tmp_path / "model", meta={"task": task, "class_names": names, "dataset": "npz:/x y",
                                               "encoder_sha256": "ab" * 32})
    out = tmp_path / "export"
    assert main(["export", "--model", str(tmp_path / "model"), "--format", "c", "--out", str(out)]) == 0
    first = (out / HEADER_NAME).read_bytes(), (out / SOURCE_NAME).read_bytes()
    (tmp_path / "main.c").write_text(PROVENANCE_DRIVER)
    exe = tmp_path / "provenance"
    subprocess.run([CC, *STRICT_FLAGS, "-I", str(out), "-o", str(exe), str(tmp_path / "main.c")],
                   check=True, capture_output=True)
    lines = subprocess.run([str(exe)], capture_output=True, check=True).stdout.decode("utf-8").split("\n")
    assert lines[:6] == ["ab" * 32, "odd", "name", "npz:/x y", names[0], names[1]]

    assert main(["export", "--model", str(tmp_path / "model"), "--format", "c", "--out", str(out)]) == 0
    kept = [p for p in out.iterdir() if p.name.startswith("replaced-")]
    assert len(kept) == 1
    assert ((kept[0] / HEADER_NAME).read_bytes(), (kept[0] / SOURCE_NAME).read_bytes()) == first


def test_a_model_without_a_record_says_unknown():
    from common.edge.deploy import to_deployment
    from common.edge.export_c import generate_c

    header, _, _ = generate_c(to_deployment(harden(trained_bnn(PAPER, seed=43), seed=44)))
    assert '#define HYBNN_ENCODER_SHA256 "unknown"' in header and '#define HYBNN_CLASS_NAMES { "0", "1" }' in header
