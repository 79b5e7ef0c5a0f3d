"""C99 code generation for a :class:`common.edge.deploy.DeployedBNN`, and a ctypes loader.

``write_c(model, out_dir)`` writes ``hybnn.h`` and ``hybnn.c``: the weights as packed
integer arrays, the thresholds, and ``hybnn_predict`` / ``hybnn_predict_batch``. The code
needs only ``<stdint.h>``: no heap, no floats, no library calls, so it fits a
microcontroller. It is plain C99 that compilers vectorize; intrinsics (SSSE3 / AVX2, from
the compiler's own header) only behind the compilers' feature macros.

Layout and loop shape, chosen for speed (the generated code is the reference for these
details):

* Everything is 32-bit words, the native word of a Cortex-M. The input code is read as
  little-endian 32-bit words (portable byte assembly, which compilers turn into one
  load) plus a tail word of the remaining bytes. The first layer's weight rows are
  packed the same way from the same byte order, so XOR and popcount see matching bits
  on every machine.
* Weights are stored unit-major as a structure of arrays: ``Lk_Wi[j]`` holds word ``i``
  of unit ``j``. For a fixed input word the loop over units is then a straight loop
  over consecutive memory, and compilers vectorize it (16 units per AVX-512
  instruction).
* Each hidden unit becomes "fires iff ``popcount(x ^ w') <= T'``": for units whose
  comparison is flipped (negative batch-norm scale) the weight bits are complemented,
  which turns ``p <= t`` into ``d' <= t``; the others use ``d <= n - t``. Here
  ``d = n - p`` counts the disagreeing bits. A layer first writes every unit's count
  into an int32 array (one vectorized loop), then compares the counts with the
  thresholds and packs the fired bits (a second one).
* Counting, chosen at compile time by feature macros:

  - with a vector popcount instruction (``__AVX512VPOPCNTDQ__``) each word is counted
    with ``__builtin_popcount``;
  - else, on x86 with ``__AVX2__`` or ``__SSSE3__``, the first layer (at most 31 code
    bytes) uses *nibble tables*: its weights are stored a second way, byte ``k`` of each
    unit as two 4-bit indices with the units side by side in byte lanes, and one
    ``vpshufb`` through a 16-entry table picked by a nibble of the code counts that
    nibble's disagreeing bits for 32 (AVX2) or 16 (SSSE3) units at once. The intrinsics
    headers are included only inside these feature checks;
  - everywhere else (Cortex-M, any compiler, the portable x86-64 baseline) the words of
    a unit are first added bit-sliced with carry-save adders into a few bit planes (7
    words -> 3 planes: ones, twos, fours), whose weighted count is one shift-and-add
    popcount: fewer counts, all in plain logic that vectorizes and needs no popcount
    instruction or library call;
  - a loop over fewer than 8 units or classes (the output of a two-class model) does
    not vectorize: with ``__POPCNT__`` it counts each word with the scalar instruction.
* Hidden activations are packed LSB-first: unit ``j`` is bit ``j % 32`` of word
  ``j / 32``; padding bits stay 0 in activations and weights alike.
* Output: ``score_c = A[c] * d_c + B[c]`` with ``A = -scale``, ``B = scale * n + offset``
  (the same integers as the affine form on ``p``), or a rank table indexed by ``d``.
  The first class with the highest score wins, like ``torch.argmax``.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.edge.deploy import DeployedBNN, check_codes
from common.errors import HyBNNError
from common.fileio import atomic_write_bytes, make_dir
from common.packing import packed_length

HEADER_NAME = "hybnn.h"
SOURCE_NAME = "hybnn.c"
STRICT_FLAGS = ("-std=c99", "-O2", "-Wall", "-Wextra", "-Werror", "-pedantic")
"""The flags the tests compile the generated code with."""
FAST_FLAGS = ("-std=c99", "-O3", "-march=native", "-Wall", "-Wextra", "-Werror")
"""The flags the benchmark uses: the same code, tuned for the machine it runs on."""
AVX2_FLAGS = ("-std=c99", "-O3", "-march=x86-64-v3", "-Wall", "-Wextra", "-Werror")
"""x86-64 with AVX2 but no AVX-512: the benchmark's stand-in for an AVX2-only machine."""


# ---------------------------------------------------------------- bit layouts
def _le_words(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, int]:
    """Rows of packed bytes -> (full uint32 words (rows, nw), tail words (rows,) or None, tail bytes).

    Byte ``4k + i`` of a row is bits ``8i .. 8i+7`` of word ``k`` (little-endian assembly,
    matching ``hybnn_load32`` in the generated code).
    """
    rows, nbytes = packed.shape
    nw, tail = divmod(nbytes, 4)
    full = packed[:, : nw * 4].reshape(rows, nw, 4).astype(np.uint32)
    shifts = (np.arange(4, dtype=np.uint32) * np.uint32(8))[None, None, :]
    words = np.bitwise_or.reduce(full << shifts, axis=2) if nw else np.zeros((rows, 0), np.uint32)
    if not tail:
        return words, None, 0
    rest = packed[:, nw * 4 :].astype(np.uint32) << (np.arange(tail, dtype=np.uint32) * np.uint32(8))[None, :]
    return words, np.bitwise_or.reduce(rest, axis=1), tail


def _lsb_words(bits: np.ndarray) -> np.ndarray:
    """Boolean rows (rows, n) -> uint32 (rows, ceil(n/32)); element ``j`` is bit ``j % 32`` of word ``j // 32``."""
    rows, n = bits.shape
    nw = -(-n // 32)
    padded = np.zeros((rows, nw * 32), dtype=np.uint32)
    padded[:, :n] = bits
    weights = np.uint32(1) << np.arange(32, dtype=np.uint32)
    return np.bitwise_or.reduce(padded.reshape(rows, nw, 32) * weights, axis=2)


def _unpack(packed: np.ndarray, n: int) -> np.ndarray:
    return np.unpackbits(packed, axis=-1, count=n, bitorder="big").astype(bool)


def _tail_type(tail_bytes: int) -> str:
    return {1: "uint8_t", 2: "uint16_t"}.get(tail_bytes, "uint32_t")


def _ctype_bytes(ctype: str) -> int:
    return {"uint8_t": 1, "uint16_t": 2, "uint32_t": 4, "uint64_t": 8, "int16_t": 2, "int32_t": 4}[ctype]


# ---------------------------------------------------------------- code emission
@dataclass
class _Array:
    name: str
    ctype: str
    values: np.ndarray
    build: str = "all"
    """"all", "words" (the builds without nibble tables) or "nibble" (SSSE3 / AVX2 builds)."""

    def nbytes(self) -> int:
        return _ctype_bytes(self.ctype) * int(self.values.size)

    def emit(self) -> str:
        fmt = {"uint64_t": "UINT64_C(0x{:016x})", "uint32_t": "0x{:08x}u", "uint16_t": "0x{:04x}u",
               "uint8_t": "0x{:02x}u"}.get(self.ctype, "{:d}")
        per_line = {"uint64_t": 4, "uint32_t": 8}.get(self.ctype, 12)

        def block(values: np.ndarray, indent: str) -> str:
            flat = [fmt.format(int(v)) for v in values]
            lines = [", ".join(flat[i : i + per_line]) for i in range(0, len(flat), per_line)]
            return f",\n{indent}".join(lines)

        dims = "".join(f"[{d}]" for d in self.values.shape)
        if self.values.ndim == 1:
            body = "    " + block(self.values, "    ")
        else:  # a table: one brace-enclosed row per class
            body = ",\n".join("    {\n        " + block(row, "        ") + "\n    }" for row in self.values)
        align = "HYBNN_ALIGN " if self.build == "nibble" else ""
        return f"static const {self.ctype} {align}{self.name}{dims} = {{\n{body}\n}};\n"


MAX_NIBBLE_BYTES = 31
"""A first layer of at most this many input bytes counts in byte lanes (8 * 31 = 248 < 256)."""


def _popcount_block(nibble_bytes: int | None) -> str:
    """The counting paths and the macros that pick one; ``nibble_bytes``: the first layer's
    input bytes when it can use nibble tables, else None."""
    popcount = """\
/* Counting the set bits of a unit's words. With a vector popcount instruction
 * (AVX-512 VPOPCNTDQ) the compiler turns __builtin_popcount in the loop over units
 * into one instruction per 16 units, so each word is counted on its own. Everywhere
 * else (AVX2, SSE, Cortex-M, any compiler) the words are first added bit-sliced with
 * carry-save adders into bit planes of weight 1, 2, 4, ...; hybnn_count3 below counts
 * three planes at once with shift-and-add steps. That needs no popcount instruction
 * and no library call, and it is plain logic that compilers vectorize on AVX2. A loop
 * over fewer than 8 units or classes does not vectorize: there the scalar popcount
 * instruction (__POPCNT__, x86-64-v2 and later) counts each word. */
#if (defined(__GNUC__) || defined(__clang__)) && defined(__AVX512VPOPCNTDQ__)
#define HYBNN_VECTOR_POPCOUNT 1
#define HYBNN_SCALAR_POPCOUNT 0
#define HYBNN_POPC32(x) ((int32_t)__builtin_popcount(x))
#else
#define HYBNN_VECTOR_POPCOUNT 0
#if (defined(__GNUC__) || defined(__clang__)) && defined(__POPCNT__)
#define HYBNN_SCALAR_POPCOUNT 1
#define HYBNN_POPC32(x) ((int32_t)__builtin_popcount(x))
#else
#define HYBNN_SCALAR_POPCOUNT 0
#endif
/* Bit counts of the four bytes of x, each in its own byte (0 .. 8). */
static inline uint32_t hybnn_byte_counts(uint32_t x)
{
    x = x - ((x >> 1) & UINT32_C(0x55555555));
    x = (x & UINT32_C(0x33333333)) + ((x >> 2) & UINT32_C(0x33333333));
    return (x + (x >> 4)) & UINT32_C(0x0f0f0f0f);
}

/* popcount(p0) + 2 popcount(p1) + 4 popcount(p2). The weighted byte counts are added
 * while still in bytes (each at most 8 + 16 + 32 = 56), then the four bytes once (at
 * most 224, so the low byte holds the sum and no carry reaches it). */
static inline int32_t hybnn_count3(uint32_t p0, uint32_t p1, uint32_t p2)
{
    uint32_t s = hybnn_byte_counts(p0) + (hybnn_byte_counts(p1) << 1) + (hybnn_byte_counts(p2) << 2);
    s = s + (s >> 8);
    s = s + (s >> 16);
    return (int32_t)(s & 0xff);
}
#endif
"""
    if nibble_bytes is None:
        return popcount + f"""
/* The first layer reads more than {MAX_NIBBLE_BYTES} bytes, too many for counts in byte lanes:
 * no nibble tables. */
#define HYBNN_NIBBLE_TABLES 0
"""
    rows = ",\n".join("    { " + ", ".join(str(bin((i & 15) ^ a).count("1")) for i in range(32)) + " }"
                      for a in range(16))
    return popcount + f"""
/* The first layer on x86 with AVX2 or SSSE3 but without VPOPCNTDQ: nibble tables.
 * Byte k of every unit's weights is stored as two 4-bit indices, units side by side in
 * byte lanes (L0_NIB[2k][j]: bits 0-3 of byte k of unit j, L0_NIB[2k + 1][j]: bits 4-7).
 * For each nibble v of the code, row v of HYBNN_NIBBLE_COUNTS maps an index i to
 * popcount(i ^ v), so one table lookup (vpshufb / pshufb) counts the disagreeing bits of
 * that nibble for 32 (AVX2) or 16 (SSSE3) units at once, and a byte add sums them: two
 * lookups and two adds per code byte and 32 units, against dozens of logic operations
 * for the carry-save form. A unit's count is at most 8 * {nibble_bytes}, so it stays in its
 * byte lane; unit j fires iff its count is below L0_U[j] (the threshold plus one, so
 * both "never" (0) and "always" fit a byte), read off with one compare and movemask per
 * lane width. HYBNN_NIBBLE_TABLES is the units per lookup (32, 16) or 0 (not used). */
#if !HYBNN_VECTOR_POPCOUNT && defined(__AVX2__)
#define HYBNN_NIBBLE_TABLES 32
#include <immintrin.h>
typedef __m256i hybnn_v;
#define HYBNN_LOAD(p) _mm256_loadu_si256((const __m256i *)(const void *)(p))
#define HYBNN_ZERO() _mm256_setzero_si256()
#define HYBNN_ADD(a, b) _mm256_add_epi8((a), (b))
#define HYBNN_LOOKUP(table, index) _mm256_shuffle_epi8((table), (index))
#define HYBNN_FIRED(count, limit) \\
    (~(uint32_t)_mm256_movemask_epi8(_mm256_cmpeq_epi8(_mm256_max_epu8((count), (limit)), (count))))
#define HYBNN_PUT(h, u, f) ((h)[(u) / 32] = (f))
#elif !HYBNN_VECTOR_POPCOUNT && defined(__SSSE3__)
#define HYBNN_NIBBLE_TABLES 16
#include <tmmintrin.h>
typedef __m128i hybnn_v;
#define HYBNN_LOAD(p) _mm_loadu_si128((const __m128i *)(const void *)(p))
#define HYBNN_ZERO() _mm_setzero_si128()
#define HYBNN_ADD(a, b) _mm_add_epi8((a), (b))
#define HYBNN_LOOKUP(table, index) _mm_shuffle_epi8((table), (index))
#define HYBNN_FIRED(count, limit) \\
    (~(uint32_t)_mm_movemask_epi8(_mm_cmpeq_epi8(_mm_max_epu8((count), (limit)), (count))) & 0xffffu)
#define HYBNN_PUT(h, u, f) ((h)[(u) / 32] = (u) % 32 ? (h)[(u) / 32] | ((f) << 16) : (f))
#else
#define HYBNN_NIBBLE_TABLES 0
#endif
#if HYBNN_NIBBLE_TABLES
#if defined(__GNUC__) || defined(__clang__)
#define HYBNN_ALIGN __attribute__((aligned(32)))
#else
#define HYBNN_ALIGN
#endif
/* GCC keeps the counts in registers with the byte loop unrolled a few times, which saves
 * the loop's bookkeeping and register moves per code byte (a few % on Zen 3). */
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 8
#define HYBNN_PRAGMA(text) _Pragma(#text)
#define HYBNN_UNROLL(n) HYBNN_PRAGMA(GCC unroll n)
#else
#define HYBNN_UNROLL(n)
#endif
/* Row v, entry i: popcount((i % 16) ^ v); 32 entries, the table of each 16-byte lane. */
static const uint8_t HYBNN_ALIGN HYBNN_NIBBLE_COUNTS[16][32] = {{
{rows}
}};
#endif
"""


_LOAD32 = [
    "/* Little-endian assembly of 4 bytes: one load on common compilers, correct on any. */",
    "static uint32_t hybnn_load32(const uint8_t *p)",
    "{",
    "    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);",
    "}",
    "",
]


SCALAR_LOOP_ROWS = 8
"""A loop over fewer units (or classes) than this does not vectorize (8 int32 lanes of AVX2):
it counts with the scalar popcount instruction where there is one."""


def _count_lines(terms: list[str], target: str, indent: str, rows: int) -> list[str]:
    """C lines that set ``target`` to the total popcount of the words ``terms`` (uint32 expressions)
    in a loop over ``rows`` units or classes.

    Both forms of :func:`_popcount_block`: the per-word hardware count, and a carry-save
    reduction of the words into bit planes counted by ``hybnn_count3``.
    """
    words = [f"a{k}" for k in range(len(terms))]
    lines = [f"{indent}const uint32_t {w} = {t};" for w, t in zip(words, terms)]
    scalar = " || HYBNN_SCALAR_POPCOUNT" if rows < SCALAR_LOOP_ROWS else ""
    lines.append(f"#if HYBNN_VECTOR_POPCOUNT{scalar}")
    lines.append(f"{indent}{target} = {' + '.join(f'HYBNN_POPC32({w})' for w in words)};")
    lines.append("#else")
    # Reduce the words of each weight with full adders (3 -> sum, carry) and half adders
    # (2 -> sum, carry), lowest weight first, until every weight has one plane.
    columns: list[list[str]] = [list(words)]
    adders: list[str] = []
    level = 0
    while level < len(columns):
        column = columns[level]
        while len(column) > 1:
            if level + 1 == len(columns):
                columns.append([])
            s, c = f"s{len(adders)}", f"c{len(adders)}"
            if len(column) >= 3:
                a, b, d = column.pop(0), column.pop(0), column.pop(0)
                adders.append(f"{indent}const uint32_t {s} = {a} ^ {b} ^ {d}, {c} = ({a} & {b}) | ({d} & ({a} ^ {b}));")
            else:
                a, b = column.pop(0), column.pop(0)
                adders.append(f"{indent}const uint32_t {s} = {a} ^ {b}, {c} = {a} & {b};")
            column.append(s)
            columns[level + 1].append(c)
        level += 1
    planes = [column[0] if column else "0" for column in columns]
    if adders:
        lines.append(f"{indent}/* carry-save adders (s: sum, c: carry); {', '.join(planes)} hold bits "
                     f"{', '.join(map(str, range(len(planes))))} of each bit position's count */")
        lines.extend(adders)
    groups = []
    for g in range(0, len(planes), 3):  # three planes per count; the sum of each group is below 256
        p0, p1, p2 = (planes[g : g + 3] + ["0", "0"])[:3]
        count = f"hybnn_count3({p0}, {p1}, {p2})"
        groups.append(count if g == 0 else f"({count} << {g})")
    lines.append(f"{indent}{target} = {' + '.join(groups)};")
    lines.append("#endif")
    return lines


NIBBLE_BLOCK_UNITS = 128
"""Units whose byte-lane counts stay in registers at once: 4 AVX2 (8 SSSE3) accumulators,
beside the two tables of the current code byte and the loaded indices."""


def _nibble_layer(bits: np.ndarray, thresh: np.ndarray, code_bytes: int, n_in: int, arrays: list[_Array]) -> str:
    """The first hidden layer in nibble-table form (see :func:`_popcount_block`); declares its arrays.

    ``bits``: the units' weight bits (units, n_in) with flipped units complemented, so unit
    ``j`` fires iff ``d_j <= thresh[j]``, ``d_j`` the disagreeing bits with the code.
    """
    units = bits.shape[0]
    padded = 32 * -(-units // 32)  # whole 32-unit groups; padding units never fire
    weight_bytes = np.zeros((padded, code_bytes), np.uint8)
    weight_bytes[:units] = np.packbits(bits, axis=1, bitorder="big")
    nibbles = np.empty((2 * code_bytes, padded), np.uint8)
    nibbles[0::2] = (weight_bytes & 0x0F).T
    nibbles[1::2] = (weight_bytes >> 4).T
    limit = np.zeros(padded, np.uint8)
    limit[:units] = np.clip(thresh + 1, 0, 255)  # d <= thresh  <=>  d < thresh + 1
    arrays.append(_Array("L0_NIB", "uint8_t", nibbles, "nibble"))
    arrays.append(_Array("L0_U", "uint8_t", limit, "nibble"))
    byte = "(uint32_t)code[k]"
    if n_in % 8:  # the code's padding bits: cleared in its last byte
        keep = (0xFF << (8 - n_in % 8)) & 0xFF
        byte = f"((uint32_t)code[k] & (k == {code_bytes - 1} ? 0x{keep:02x}u : 0xffu))"

    unroll = next((f for f in (5, 4, 3) if code_bytes % f == 0), 2)

    def block(start: str, block_units: int) -> str:
        lanes = f"{block_units} / HYBNN_NIBBLE_TABLES"
        return f"""
        hybnn_v acc[{lanes}];
        for (b = 0; b < {lanes}; ++b) {{
            acc[b] = HYBNN_ZERO();
        }}
        HYBNN_UNROLL({unroll})
        for (k = 0; k < {code_bytes}; ++k) {{
            const uint32_t x = {byte};
            const hybnn_v lo = HYBNN_LOAD(HYBNN_NIBBLE_COUNTS[x & 15]), hi = HYBNN_LOAD(HYBNN_NIBBLE_COUNTS[x >> 4]);
            for (b = 0; b < {lanes}; ++b) {{
                const int32_t u = {start} + HYBNN_NIBBLE_TABLES * b;
                acc[b] = HYBNN_ADD(acc[b], HYBNN_ADD(HYBNN_LOOKUP(lo, HYBNN_LOAD(&L0_NIB[2 * k][u])),
                                                     HYBNN_LOOKUP(hi, HYBNN_LOAD(&L0_NIB[2 * k + 1][u]))));
            }}
        }}
        for (b = 0; b < {lanes}; ++b) {{
            const int32_t u = {start} + HYBNN_NIBBLE_TABLES * b;
            HYBNN_PUT(h1, u, HYBNN_FIRED(acc[b], HYBNN_LOAD(&L0_U[u])));
        }}"""

    full, rest = divmod(padded, NIBBLE_BLOCK_UNITS)
    text = f"""
    /* hidden layer 0: {n_in} -> {units} with nibble tables, blocks of at most {NIBBLE_BLOCK_UNITS} units whose
     * byte-lane counts stay in registers over the {code_bytes} code bytes; packed LSB-first
     * 32 units to a word, the padding units to {padded} never fire. */"""
    if full:
        text += f"""
    for (j = 0; j < {full * NIBBLE_BLOCK_UNITS}; j += {NIBBLE_BLOCK_UNITS}) {{{block("j", NIBBLE_BLOCK_UNITS)}
    }}"""
    if rest:
        text += f"""
    j = {full * NIBBLE_BLOCK_UNITS};
    {{{block("j", rest)}
    }}"""
    return text


def _working_bytes(model: DeployedBNN) -> int:
    """Stack bytes ``hybnn_classify`` needs, about: the counts, the packed layers, the output counts, scalars."""
    cfg = model.config
    hidden = 4 * max(cfg.hidden, default=0) + sum(4 * -(-h // 32) for h in cfg.hidden)
    return hidden + 4 * cfg.num_classes + 64


def generate_c(model: DeployedBNN) -> tuple[str, str, int]:
    """Return ``(header text, source text, model bytes in the C arrays)``."""
    cfg = model.config
    if cfg.num_classes > 256:
        raise HyBNNError(f"The C export returns classes as uint8_t, but this model has {cfg.num_classes} classes (at most 256).")
    n0 = cfg.in_bits
    code_bytes = packed_length(n0)
    arrays: list[_Array] = []
    body: list[str] = []

    # ---- the first layer reads the input code's bytes
    widths = (cfg.in_bits, *cfg.hidden)
    nibble = bool(model.hidden) and code_bytes <= MAX_NIBBLE_BYTES  # the first layer may use nibble tables
    nw0, tail0 = divmod(code_bytes, 4)
    load = [f"    const uint32_t x{k} = hybnn_load32(code + {4 * k});" for k in range(nw0)]
    if tail0:
        parts = " | ".join(f"((uint32_t)code[{4 * nw0 + i}] << {8 * i})" for i in range(tail0))
        mask = ""
        if n0 % 8:
            keep = (0xFF << (8 - n0 % 8)) & 0xFF
            full_mask = ((1 << (8 * (tail0 - 1))) - 1) | (keep << (8 * (tail0 - 1)))
            mask = f" & UINT32_C(0x{full_mask:x})"
        load.append(f"    const uint32_t xt = ({parts}){mask};")
    if nibble:  # the word loads belong to the words form of the first layer
        load = ["#if !HYBNN_NIBBLE_TABLES", *load, "#endif"]
    body.extend(load)

    def layer_inputs(index: int) -> tuple[list[str], str | None]:
        """Expressions for the layer's input words and its tail word."""
        if index == 0:
            return [f"x{k}" for k in range(nw0)], ("xt" if tail0 else None)
        nw = -(-widths[index] // 32)
        return [f"h{index}[{k}]" for k in range(nw)], None

    def weight_words(index: int, bits: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, int]:
        """Weight bit rows (units, n) -> words in the layout of the layer's input."""
        if index == 0:
            packed = np.packbits(bits, axis=1, bitorder="big")
            return _le_words(packed)
        return _lsb_words(bits), None, 0

    def weight_terms(index: int, prefix: str, words: np.ndarray, tail: np.ndarray | None, tail_bytes: int,
                     unit: str, build: str = "all") -> list[str]:
        """Declare the layer's weight arrays; return the XOR terms ``x_k ^ W_k[unit]``."""
        xs, xt = layer_inputs(index)
        terms = []
        for k in range(words.shape[1]):
            arrays.append(_Array(f"{prefix}_W{k}", "uint32_t", words[:, k], build))
            terms.append(f"{xs[k]} ^ {prefix}_W{k}[{unit}]")
        if tail is not None:
            arrays.append(_Array(f"{prefix}_WT", _tail_type(tail_bytes), tail, build))
            terms.append(f"{xt} ^ {prefix}_WT[{unit}]")
        return terms

    for i, layer in enumerate(model.hidden):
        n, h = layer.n_in, layer.n_out
        bits = _unpack(layer.weights, n)
        t = layer.threshold.astype(np.int64)
        bits = np.where(layer.flip[:, None], ~bits, bits)
        thresh = np.where(layer.flip, t, n - t)  # fires iff d' <= thresh
        words, tail, tail_bytes = weight_words(i, bits)
        build = "words" if i == 0 and nibble else "all"
        terms = weight_terms(i, f"L{i}", words, tail, tail_bytes, "j", build)
        arrays.append(_Array(f"L{i}_T", "int16_t", thresh.astype(np.int16), build))
        full, rest = divmod(h, 32)
        pack = []
        if full:
            pack.append(f"""
    for (k = 0; k < {full}; ++k) {{
        uint32_t m = 0;
        for (b = 0; b < 32; ++b) {{
            m |= (uint32_t)(cnt[32 * k + b] <= L{i}_T[32 * k + b]) << b;
        }}
        h{i + 1}[k] = m;
    }}""")
        if rest:
            pack.append(f"""
    h{i + 1}[{full}] = 0;  /* the last {rest} unit(s); the padding bits stay 0 */
    for (b = 0; b < {rest}; ++b) {{
        h{i + 1}[{full}] |= (uint32_t)(cnt[{32 * full} + b] <= L{i}_T[{32 * full} + b]) << b;
    }}""")
        count = "\n".join(_count_lines(terms, "cnt[j]", "        ", h))
        words_form = f"""
    /* hidden layer {i}: {n} -> {h}; unit j fires iff popcount(x ^ w'_j) <= T_j. Two
     * straight loops over the units, which compilers vectorize: the counts, then the
     * comparisons, packed LSB-first 32 units to a word. */
    for (j = 0; j < {h}; ++j) {{
{count}
    }}{"".join(pack)}"""
        if build == "words":
            body.append("\n#if HYBNN_NIBBLE_TABLES" + _nibble_layer(bits, thresh, code_bytes, n0, arrays)
                        + "\n#else" + words_form + "\n#endif")
        else:
            body.append(words_form)

    # ---- output layer
    out = model.output
    n, c = out.n_in, out.n_out
    idx = len(model.hidden)
    bits = _unpack(out.weights, n)
    words, tail, tail_bytes = weight_words(idx, bits)
    terms = weight_terms(idx, "OUT", words, tail, tail_bytes, "c")
    if out.form == "affine":
        scale = out.scale.astype(np.int64)
        arrays.append(_Array("OUT_A", "int32_t", (-scale).astype(np.int32)))
        arrays.append(_Array("OUT_B", "int32_t", (scale * n + out.offset.astype(np.int64)).astype(np.int32)))
        score = "OUT_A[c] * d + OUT_B[c]"
    else:
        table = out.table[:, ::-1]  # indexed by d = n - p
        ctype = "int16_t" if table.max() < 2**15 else "int32_t"
        arrays.append(_Array("OUT_TAB", ctype, np.ascontiguousarray(table)))
        score = "(int32_t)OUT_TAB[c][d]"
    count = "\n".join(_count_lines(terms, "dc[c]", "        ", c))
    body.append(f"""
    /* output layer: {n} -> {c}; first class with the highest integer score. The counts
     * get a loop of their own, which compilers vectorize over the classes. */
    for (c = 0; c < {c}; ++c) {{
{count}
    }}
    for (c = 0; c < {c}; ++c) {{
        const int32_t d = dc[c], score = {score};
        if (c == 0 || score > best_score) {{
            best_score = score;
            best = c;
        }}
    }}
    return (uint8_t)best;""")

    model_bytes = sum(a.nbytes() for a in arrays if a.build != "nibble")
    nibble_bytes = sum(a.nbytes() for a in arrays if a.build != "words")
    decls = ["    int32_t j, k, b, c, best = 0, best_score = 0;"]
    if len(model.hidden) > 1 or (model.hidden and not nibble):  # the hidden layers' counts, one at a time
        decls.append(f"    int32_t cnt[{max(cfg.hidden)}];")
    elif model.hidden:  # only the words form of the first layer counts into memory
        decls.extend(["#if !HYBNN_NIBBLE_TABLES", f"    int32_t cnt[{max(cfg.hidden)}];", "#endif"])
    decls.append(f"    int32_t dc[{c}];")
    for i, layer in enumerate(model.hidden):
        decls.append(f"    uint32_t h{i + 1}[{-(-layer.n_out // 32)}];")
    unused = []
    if not model.hidden:
        unused.append("    (void)j; (void)k; (void)b;")
    elif max(cfg.hidden) < 32:  # no full word of hidden units: no loop over words
        unused.append("    (void)k;")

    def size_check(kept: list[_Array], macro: str) -> str:
        return ("typedef char hybnn_model_bytes_check[(" + " + ".join(f"sizeof({a.name})" for a in kept)
                + f") == {macro} ? 1 : -1];")

    shared = [a for a in arrays if a.build == "all"]
    if nibble:
        nibble_arrays = [a for a in arrays if a.build == "nibble"]
        word_arrays = [a for a in arrays if a.build == "words"]
        array_lines = [
            "#if HYBNN_NIBBLE_TABLES", *[a.emit() for a in nibble_arrays],
            "#else", *[a.emit() for a in word_arrays], "#endif",
            *[a.emit() for a in shared],
            f"/* The C arrays above hold {model_bytes} bytes (HYBNN_MODEL_BYTES), or {nibble_bytes} with nibble",
            " * tables (HYBNN_NIBBLE_MODEL_BYTES). */",
            "#if HYBNN_NIBBLE_TABLES",
            size_check(nibble_arrays + shared, "HYBNN_NIBBLE_MODEL_BYTES"),
            "#define HYBNN_BUILD_MODEL_BYTES HYBNN_NIBBLE_MODEL_BYTES",
            "#else",
            size_check(word_arrays + shared, "HYBNN_MODEL_BYTES"),
            "#define HYBNN_BUILD_MODEL_BYTES HYBNN_MODEL_BYTES",
            "#endif",
        ]
    else:
        array_lines = [
            *[a.emit() for a in shared],
            f"/* The C arrays above hold {model_bytes} bytes: HYBNN_MODEL_BYTES. */",
            size_check(shared, "HYBNN_MODEL_BYTES"),
            "#define HYBNN_BUILD_MODEL_BYTES HYBNN_MODEL_BYTES",
        ]

    header = _header(model, code_bytes, model_bytes, nibble_bytes if nibble else None)
    source = "\n".join([
        f"/* Generated by HyBNN (common/edge/export_c.py) from a trained BNN {cfg.in_bits}-"
        f"{'-'.join(map(str, cfg.hidden))}{'-' if cfg.hidden else ''}{cfg.num_classes}. Do not edit. */",
        f'#include "{HEADER_NAME}"',
        "",
        _popcount_block(code_bytes if nibble else None),
        *((["#if !HYBNN_NIBBLE_TABLES", *_LOAD32, "#endif"] if nibble else _LOAD32) if nw0 else []),
        *array_lines,
        "",
        "static uint8_t hybnn_classify(const uint8_t *code)",
        "{",
        *decls,
        *unused,
        *body,
        "}",
        "",
        "uint8_t hybnn_predict(const uint8_t code[HYBNN_CODE_BYTES])",
        "{",
        "    return hybnn_classify(code);",
        "}",
        "",
        "void hybnn_predict_batch(const uint8_t *codes, int32_t n, uint8_t *out)",
        "{",
        "    int32_t i;",
        "    for (i = 0; i < n; ++i) {",
        "        out[i] = hybnn_classify(codes);",
        "        codes += HYBNN_CODE_BYTES;",
        "    }",
        "}",
        "",
        "int32_t hybnn_model_bytes(void)",
        "{",
        "    return HYBNN_BUILD_MODEL_BYTES;",
        "}",
        "",
    ])
    return header, source, model_bytes


def c_string(text: str) -> str:
    """``text`` as a C string literal: printable ASCII as is, every other byte of its UTF-8
    as a three-digit octal escape (octal, because a hex escape would swallow a following
    hex digit)."""
    out = []
    for byte in str(text).encode("utf-8"):
        char = chr(byte)
        out.append(char if 0x20 <= byte < 0x7F and char not in '"\\?' else f"\\{byte:03o}")
    return '"' + "".join(out) + '"'


def _provenance(model: DeployedBNN) -> str:
    """The #defines that name what made the model: its encoder, task and class order (from the
    saved BNN's meta; "unknown" where the model came without one)."""
    source = model.meta.get("source") or {}
    names = source.get("class_names") or [str(i) for i in range(model.config.num_classes)]
    if len(names) != model.config.num_classes:
        names = [str(i) for i in range(model.config.num_classes)]
    return "\n".join([
        "/* What made this model: the frozen encoder whose codes it reads (its sha256), the task,",
        " * and the class each returned index stands for (HYBNN_CLASS_NAMES[i] is class i). */",
        f"#define HYBNN_ENCODER_SHA256 {c_string(source.get('encoder_sha256') or 'unknown')}",
        f"#define HYBNN_WEIGHTS_SHA256 {c_string(model.meta.get('weights_sha256') or 'unknown')}",
        f"#define HYBNN_DATASET {c_string(source.get('dataset') or 'unknown')}",
        f"#define HYBNN_TASK {c_string(source.get('task') or 'unknown')}",
        "#define HYBNN_CLASS_NAMES { " + ", ".join(c_string(n) for n in names) + " }",
    ])


def _header(model: DeployedBNN, code_bytes: int, model_bytes: int, nibble_bytes: int | None) -> str:
    cfg = model.config
    pad = code_bytes * 8 - cfg.in_bits
    pad_note = (f" The last {pad} bit(s) of byte {code_bytes - 1} are padding and are ignored."
                if pad else "")
    nibble_note, nibble_define, intrinsics_note = "", "", ""
    if nibble_bytes is not None:
        nibble_note = ("\n * A build for x86 with AVX2 or SSSE3 and without AVX-512 VPOPCNTDQ keeps the first layer\n"
                       " * as nibble tables instead: HYBNN_NIBBLE_MODEL_BYTES. hybnn_model_bytes() returns the\n"
                       " * figure of the build it is in.")
        nibble_define = f"\n#define HYBNN_NIBBLE_MODEL_BYTES {nibble_bytes}"
        intrinsics_note = " (built for x86 with SSSE3 or AVX2, hybnn.c also includes the\n * compiler's intrinsics header)"
    return f"""\
/* Generated by HyBNN (common/edge/export_c.py). Do not edit.
 *
 * A binary neural network {cfg.in_bits} -> {" -> ".join(map(str, cfg.hidden))}{" -> " if cfg.hidden else ""}{cfg.num_classes}, in integer form:
 * packed sign weights, batch norm folded into popcount thresholds, an integer
 * output score. It predicts exactly what the trained torch model predicts in eval
 * mode, for every possible input code.
 *
 * Needs: C99 and <stdint.h>{intrinsics_note}. No heap, no floating point, no library calls, no
 * global state: the functions are reentrant. Working memory: about {_working_bytes(model)} bytes.
 *
 * Input contract. A code is HYBNN_CODE_BYTES = {code_bytes} bytes holding the encoder's
 * {cfg.in_bits} bits. Bit i of the code (i = 0 .. {cfg.in_bits - 1}) is bit (7 - i % 8) of byte i / 8,
 * most significant bit first (numpy: np.packbits(bits, bitorder="big")); a 1 bit
 * means +1, a 0 bit means -1.{pad_note} The caller passes exactly
 * HYBNN_CODE_BYTES readable bytes; the functions do not check pointers.
 */
#ifndef HYBNN_H
#define HYBNN_H

#include <stdint.h>

#define HYBNN_IN_BITS {cfg.in_bits}
#define HYBNN_CODE_BYTES {code_bytes}
#define HYBNN_NUM_CLASSES {cfg.num_classes}
/* Bytes of the model's constant arrays (weights, thresholds, output scores).{nibble_note} */
#define HYBNN_MODEL_BYTES {model_bytes}{nibble_define}

{_provenance(model)}

#ifdef __cplusplus
extern "C" {{
#endif

/* The class index (0 .. HYBNN_NUM_CLASSES - 1) of one code of HYBNN_CODE_BYTES bytes. */
uint8_t hybnn_predict(const uint8_t code[HYBNN_CODE_BYTES]);

/* Classify n codes stored back to back (n * HYBNN_CODE_BYTES bytes) into out[0 .. n-1].
 * n <= 0 does nothing. */
void hybnn_predict_batch(const uint8_t *codes, int32_t n, uint8_t *out);

/* HYBNN_MODEL_BYTES, for callers that load the code dynamically. */
int32_t hybnn_model_bytes(void);

#ifdef __cplusplus
}}
#endif

#endif /* HYBNN_H */
"""


def write_c(model: DeployedBNN, out_dir: Path | str) -> list[Path]:
    """Write ``hybnn.h`` and ``hybnn.c`` for ``model`` into ``out_dir``; return their paths."""
    header, source, _ = generate_c(model)
    out_dir = make_dir(out_dir)
    paths = [out_dir / HEADER_NAME, out_dir / SOURCE_NAME]
    for path, text in zip(paths, (header, source)):
        atomic_write_bytes(path, text.encode())
    return paths


# ---------------------------------------------------------------- compiling and loading
def find_c_compiler() -> str | None:
    """The first of ``cc``, ``gcc``, ``clang`` on PATH, or None."""
    for name in ("cc", "gcc", "clang"):
        path = shutil.which(name)
        if path:
            return path
    return None


def compile_shared(c_dir: Path | str, out: Path | str, flags: tuple[str, ...] = STRICT_FLAGS) -> Path:
    """Compile ``c_dir/hybnn.c`` into the shared library ``out``; a failure is a HyBNNError."""
    compiler = find_c_compiler()
    if compiler is None:
        raise HyBNNError("No C compiler (cc, gcc or clang) found on PATH. Install one to build the C export.")
    c_dir, out = Path(c_dir), Path(out)
    cmd = [compiler, *flags, "-shared", "-fPIC", "-o", str(out), str(c_dir / SOURCE_NAME)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise HyBNNError(f"Compiling the C export failed: {' '.join(cmd)}\n{proc.stderr.strip()}")
    return out


class CKernel:
    """The compiled C head, called through ctypes."""

    def __init__(self, library: Path | str, in_bits: int) -> None:
        self.lib = ctypes.CDLL(str(library))
        self.in_bits = in_bits
        self.lib.hybnn_predict.argtypes = [ctypes.c_void_p]
        self.lib.hybnn_predict.restype = ctypes.c_uint8
        self.lib.hybnn_predict_batch.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.c_void_p]
        self.lib.hybnn_predict_batch.restype = None
        self.lib.hybnn_model_bytes.restype = ctypes.c_int32

    @property
    def model_bytes(self) -> int:
        return int(self.lib.hybnn_model_bytes())

    def predict(self, codes: np.ndarray) -> np.ndarray:
        """Class indices (int64) for packed codes uint8 ``(N, code_bytes)``, one batch call."""
        codes = check_codes(codes, self.in_bits)
        out = np.empty(len(codes), dtype=np.uint8)
        self.lib.hybnn_predict_batch(codes.ctypes.data, len(codes), out.ctypes.data)
        return out.astype(np.int64)

    def predict_one(self, code: np.ndarray) -> int:
        """One code through ``hybnn_predict``; the caller guarantees shape and dtype."""
        return int(self.lib.hybnn_predict(code.ctypes.data))


def build_kernel(model: DeployedBNN, work_dir: Path | str | None = None,
                 flags: tuple[str, ...] = STRICT_FLAGS) -> CKernel:
    """Generate, compile and load the C head of ``model`` (in ``work_dir`` or a temp dir)."""
    work = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="hybnn-c-"))
    write_c(model, work)
    lib = compile_shared(work, work / "libhybnn.so", flags)
    return CKernel(lib, model.config.in_bits)
