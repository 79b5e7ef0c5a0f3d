"""The deployment form of a trained BNN, its exact conversion, and a numpy engine.

Training form (:class:`common.bnn.model.BNN`): latent float weights, float batch norm.
Deployment form (:class:`DeployedBNN`, as in FINN and Larq Compute Engine): packed
sign bits and integers only.

Notation. A binary layer with ``n`` inputs sees input bits ``x`` and weight bits ``w``
(bit 1 = +1, :mod:`common.packing`). Its ``+-1`` dot product is ``2 * p - n`` where
``p = popcount(xnor(x, w))`` is the number of agreeing bits, ``0 <= p <= n``.

* Hidden unit: torch computes ``sign(bn(2p - n))`` in float32. We fold that into one
  integer threshold ``t`` on ``p``: the unit outputs +1 iff ``p >= t`` (``flip`` false:
  the batch-norm scale is positive) or iff ``p <= t`` (``flip`` true: negative scale).
  A unit whose output never changes (zero scale) is stored as ``p >= 0`` (always +1)
  or ``p >= n + 1`` (never).
* Output class ``c``: an integer score ``scale[c] * p_c + offset[c]``, and the
  prediction is the first index of the largest score, like ``torch.argmax``.

Why the conversion is exact, not approximately so. ``p`` takes only ``n + 1`` values,
so the conversion does not reason about floating point at all: it runs the model's own
batch-norm modules (eval mode, float32, the same kernel as inference) on every possible
pre-activation ``2p - n`` and reads off the answer.

* Hidden: the sign over ``p = 0..n`` is checked to be a step function (float rounding
  is monotone, so it always is), and the step is the threshold.
* Output: the argmax depends only on comparisons ``logit_c(p) >= logit_c'(p')`` between
  classes ``c < c'`` (ties go to the lower index). The integer affine form is accepted
  only after checking *every* such comparison, for all ``(p, p')``, against the float32
  table; agreement is therefore proven for every possible input, not sampled. If float
  rounding made two logits tie where the real affine values differ, no affine form can
  reproduce that tie; then, and only then, the output uses an integer rank table
  (``table[c, p]`` = rank of ``logit_c(p)`` among all tabulated logits), which is exact
  by construction. :attr:`OutputLayer.form` says which one a model uses.

The numpy engine (:func:`predict`) works on packed input codes with
``np.bitwise_count`` on uint64 words.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from common.bnn.model import BNN, BNNConfig
from common.errors import HyBNNError
from common.fileio import atomic_write_bytes, make_dir
from common.packing import BIT_ORDER, pack_signs, packed_length

EDGE_FORMAT = "hybnn-edge"
EDGE_FORMAT_VERSION = 1
NPZ_NAME = "hybnn_edge.npz"
SCORE_LIMIT = 2**30
"""Bound on ``|scale| * n + |offset|``, so integer scores fit int32 with room to spare."""

OutputForm = Literal["auto", "affine", "table"]


# ---------------------------------------------------------------- the deployment form
@dataclass(frozen=True)
class HiddenLayer:
    """A binary layer whose batch norm and sign are folded into thresholds.

    ``weights``: uint8 ``(n_out, ceil(n_in / 8))``, the packed sign weights (bit 1 = +1,
    :mod:`common.packing` bit order). Unit ``j`` outputs +1 iff ``p_j >= threshold[j]``
    when ``flip[j]`` is false, iff ``p_j <= threshold[j]`` when it is true, where
    ``p_j`` counts the input bits equal to the weight bits.
    """

    n_in: int
    weights: np.ndarray
    threshold: np.ndarray
    flip: np.ndarray

    @property
    def n_out(self) -> int:
        return int(self.weights.shape[0])


@dataclass(frozen=True)
class OutputLayer:
    """The last binary layer, batch norm folded into integer scores.

    ``form == "affine"``: ``score_c = scale[c] * p_c + offset[c]`` (int32 range);
    ``form == "table"``: ``score_c = table[c, p_c]``. Prediction: first argmax.
    """

    n_in: int
    weights: np.ndarray
    form: Literal["affine", "table"]
    scale: np.ndarray | None = None
    offset: np.ndarray | None = None
    table: np.ndarray | None = None

    @property
    def n_out(self) -> int:
        return int(self.weights.shape[0])


@dataclass(frozen=True)
class DeployedBNN:
    """A trained BNN in integer form: packed weights, thresholds, integer output scores."""

    config: BNNConfig
    hidden: tuple[HiddenLayer, ...]
    output: OutputLayer
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def code_bytes(self) -> int:
        """Bytes of one packed input code."""
        return packed_length(self.config.in_bits)

    def arrays(self) -> dict[str, np.ndarray]:
        """Every array of the model, by the name it has in the npz file."""
        out: dict[str, np.ndarray] = {}
        for i, layer in enumerate(self.hidden):
            out[f"hidden{i}.weights"] = layer.weights
            out[f"hidden{i}.threshold"] = layer.threshold
            out[f"hidden{i}.flip"] = layer.flip
        out["out.weights"] = self.output.weights
        for name in ("scale", "offset", "table"):
            value = getattr(self.output, name)
            if value is not None:
                out[f"out.{name}"] = value
        return out

    def nbytes(self) -> int:
        """Bytes of the model's arrays as the numpy engine holds them."""
        return int(sum(a.nbytes for a in self.arrays().values()))

    def digest(self) -> str:
        """sha256 over the config and every array; stored in the npz to catch corruption."""
        h = hashlib.sha256(json.dumps(self.config.to_dict(), sort_keys=True).encode())
        h.update(self.output.form.encode())
        for name, value in sorted(self.arrays().items()):
            h.update(name.encode())
            h.update(str(value.dtype).encode())
            h.update(str(value.shape).encode())
            h.update(np.ascontiguousarray(value).tobytes())
        return h.hexdigest()


def _validate(model: DeployedBNN) -> None:
    """Check shapes, dtypes and ranges, so that a bad model fails here, not in the engine."""
    cfg = model.config
    widths = (cfg.in_bits, *cfg.hidden)
    problem = None
    if len(model.hidden) != len(cfg.hidden):
        problem = f"{len(model.hidden)} hidden layers, but the config names {len(cfg.hidden)}"
    else:
        for i, layer in enumerate(model.hidden):
            n, h = widths[i], widths[i + 1]
            if layer.n_in != n or layer.weights.shape != (h, packed_length(n)) or layer.weights.dtype != np.uint8:
                problem = f"hidden layer {i} weights are {layer.weights.dtype}{layer.weights.shape}, expected uint8({h}, {packed_length(n)})"
            elif layer.threshold.shape != (h,) or layer.threshold.dtype != np.int16:
                problem = f"hidden layer {i} thresholds are {layer.threshold.dtype}{layer.threshold.shape}, expected int16({h},)"
            elif layer.flip.shape != (h,) or layer.flip.dtype != np.bool_:
                problem = f"hidden layer {i} flips are {layer.flip.dtype}{layer.flip.shape}, expected bool({h},)"
            elif layer.threshold.size and (layer.threshold.min() < -1 or layer.threshold.max() > n + 1):
                problem = f"hidden layer {i} has thresholds outside [-1, {n + 1}]"
            elif _padding_bits_set(layer.weights, n):
                problem = f"hidden layer {i} has weight padding bits set"
            if problem:
                break
    if problem is None:
        out, n, c = model.output, widths[-1], cfg.num_classes
        if out.n_in != n or out.weights.shape != (c, packed_length(n)) or out.weights.dtype != np.uint8:
            problem = f"output weights are {out.weights.dtype}{out.weights.shape}, expected uint8({c}, {packed_length(n)})"
        elif _padding_bits_set(out.weights, n):
            problem = "output weights have padding bits set"
        elif out.form == "affine":
            if out.scale is None or out.offset is None or out.scale.shape != (c,) or out.offset.shape != (c,) \
                    or out.scale.dtype != np.int32 or out.offset.dtype != np.int32:
                problem = f"the affine output needs int32 scale and offset of shape ({c},)"
            elif np.any(np.abs(out.scale.astype(np.int64)) * n + np.abs(out.offset.astype(np.int64)) > SCORE_LIMIT):
                problem = "the affine output's scores could overflow int32"
        elif out.form == "table":
            if out.table is None or out.table.shape != (c, n + 1) or out.table.dtype != np.int32:
                problem = f"the output table must be int32 of shape ({c}, {n + 1})"
        else:
            problem = f"unknown output form {out.form!r}"
    if problem:
        raise HyBNNError(f"Invalid deployment model: {problem}. Convert the trained BNN again with to_deployment().")


def _padding_bits_set(packed: np.ndarray, n_bits: int) -> bool:
    rem = n_bits % 8
    if rem == 0 or packed.size == 0:
        return False
    mask = np.uint8((0xFF >> rem) & 0xFF)  # the low (8 - rem) bits of the last byte are padding
    return bool(np.any(packed[:, -1] & mask))


# ---------------------------------------------------------------- conversion
def _require_trained_bnn(model: object) -> BNN:
    fix = "Export a BNN trained with `hybnn train` (common.bnn.model.BNN after common.bnn.training.fit)."
    if not isinstance(model, BNN):
        raise HyBNNError(f"Cannot export a {type(model).__name__}: only a trained BNN (common.bnn.model.BNN) has a deployment form. {fix}")
    for name, bn in [*((f"hidden_bn.{i}", b) for i, b in enumerate(model.hidden_bn)), ("out_bn", model.out_bn)]:
        if not isinstance(bn, nn.BatchNorm1d) or bn.running_mean is None or bn.running_var is None:
            raise HyBNNError(f"{name} keeps no running statistics, so its eval-mode output is undefined. {fix}")
        # The batch counter alone is not evidence: the federated wire format does not carry it.
        untouched = bool((bn.running_mean == 0).all() and (bn.running_var == 1).all())
        if untouched and (bn.num_batches_tracked is None or int(bn.num_batches_tracked) == 0):
            raise HyBNNError(f"This BNN was never trained ({name} still has its initial statistics: "
                             f"mean 0, variance 1, 0 batches seen). {fix}")
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise HyBNNError(f"This BNN's {name} holds NaN or infinite values, so it cannot be folded into integers. {fix}")
    return model


def _preactivation_grid(n: int, width: int) -> torch.Tensor:
    """float32 ``(n + 1, width)``: row ``p`` holds ``2p - n`` in every column."""
    dots = (2 * torch.arange(n + 1, dtype=torch.float32) - n).unsqueeze(1)
    return dots.expand(n + 1, width).contiguous()


def fold_sign_thresholds(bn: nn.BatchNorm1d, n: int, index: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``sign(bn(2p - n))`` of an eval-mode batch norm over ``n`` binary inputs, as integer thresholds.

    Returns ``(threshold int16, flip bool)`` per unit, as :class:`HiddenLayer` holds them: the
    unit fires iff ``p >= threshold`` (``p <= threshold`` where ``flip``), exactly (see the module doc).
    """
    h = bn.num_features
    with torch.no_grad():
        fires = (bn(_preactivation_grid(n, h)) >= 0).numpy()  # sign(0) = +1, as common.binarize.sign
    threshold = np.empty(h, dtype=np.int16)
    flip = np.zeros(h, dtype=np.bool_)
    for j in range(h):
        f = fires[:, j]
        if f.all() or not f.any():
            threshold[j] = 0 if f[0] else n + 1
        elif np.all(f[1:] >= f[:-1]):  # off ... off on ... on
            threshold[j] = int(np.argmax(f))
        elif np.all(f[1:] <= f[:-1]):  # on ... on off ... off
            flip[j] = True
            threshold[j] = int(n - np.argmax(f[::-1]))
        else:  # float rounding is monotone, so a well-formed batch norm never lands here
            raise HyBNNError(
                f"Hidden layer {index}, unit {j}: its sign is not a step function of the popcount, "
                "so it has no threshold form. Check the model's batch-norm parameters."
            )
    return threshold, flip


def _fold_hidden(linear: nn.Linear, bn: nn.BatchNorm1d, index: int) -> HiddenLayer:
    threshold, flip = fold_sign_thresholds(bn, linear.in_features, index)
    return HiddenLayer(n_in=linear.in_features, weights=pack_signs(linear.weight.detach().numpy()),
                       threshold=threshold, flip=flip)


def _cross_class_orders_match(logits: np.ndarray, scores: np.ndarray) -> bool:
    """True iff ``scores`` decides every ``logit_c(p) >= logit_c'(p')``, ``c < c'``, as ``logits`` do.

    Those comparisons are all that ``argmax`` (first index on ties) looks at, so a match
    here proves identical predictions for every input.
    """
    c = logits.shape[0]
    for a in range(c):
        for b in range(a + 1, c):
            want = logits[a][:, None] >= logits[b][None, :]
            got = scores[a][:, None] >= scores[b][None, :]
            if not np.array_equal(want, got):
                return False
    return True


def _affine_candidates(bn: nn.BatchNorm1d, logits: np.ndarray, n: int):
    """Integer ``(scale, offset)`` pairs to try, from the batch norm's real affine map."""
    gamma = bn.weight.detach().double().numpy()
    beta = bn.bias.detach().double().numpy()
    mean = bn.running_mean.detach().double().numpy()
    var = bn.running_var.detach().double().numpy()
    alpha = gamma / np.sqrt(var + bn.eps)
    from_params = (2 * alpha, beta - mean * alpha - n * alpha)  # logit(p) = A p + B
    if n > 0:  # the same line through the float32 table's end points
        a_tab = (logits[:, n] - logits[:, 0]) / n
        from_table = (a_tab, logits[:, 0])
    else:
        from_table = (np.zeros_like(alpha), logits[:, 0])
    for slope, intercept in (from_params, from_table):
        size = float(np.max(np.abs(slope) * n + np.abs(intercept)))
        if size == 0.0:
            yield np.zeros_like(slope, dtype=np.int64), np.zeros_like(slope, dtype=np.int64)
            continue
        k = int(np.floor(np.log2(SCORE_LIMIT / size))) - 1
        for shift in (k, k - 4, k - 8):
            s = np.rint(np.ldexp(slope, shift)).astype(np.int64)
            o = np.rint(np.ldexp(intercept, shift)).astype(np.int64)
            if np.all(np.abs(s) * n + np.abs(o) <= SCORE_LIMIT):
                yield s, o


def _fold_output(linear: nn.Linear, bn: nn.BatchNorm1d, form: OutputForm) -> OutputLayer:
    n, c = linear.in_features, linear.out_features
    logits = bn(_preactivation_grid(n, c)).numpy().T.astype(np.float64)  # (c, n + 1), exact copy
    if not np.all(np.isfinite(logits)):
        raise HyBNNError("The output batch norm gives NaN or infinite logits; this BNN cannot be deployed. Retrain it.")
    weights = pack_signs(linear.weight.detach().numpy())
    p = np.arange(n + 1, dtype=np.int64)
    if form in ("auto", "affine"):
        for scale, offset in _affine_candidates(bn, logits, n):
            scores = scale[:, None] * p[None, :] + offset[:, None]
            if _cross_class_orders_match(logits, scores):
                return OutputLayer(n_in=n, weights=weights, form="affine",
                                   scale=scale.astype(np.int32), offset=offset.astype(np.int32))
        if form == "affine":
            raise HyBNNError(
                "No integer affine form reproduces this BNN's float32 output ranking exactly "
                "(float rounding makes some logits of different classes tie). "
                "Use output_form='auto' or 'table', which stores an exact integer rank table instead."
            )
    _, ranks = np.unique(logits, return_inverse=True)
    table = ranks.reshape(logits.shape).astype(np.int32)
    return OutputLayer(n_in=n, weights=weights, form="table", table=table)


def to_deployment(model: BNN, *, output_form: OutputForm = "auto", meta: dict | None = None) -> DeployedBNN:
    """Fold a trained BNN into its integer deployment form, exactly (see the module doc).

    ``output_form``: ``"auto"`` (affine if one is exact, else the rank table),
    ``"affine"`` (raise if none is exact) or ``"table"``.
    """
    model = _require_trained_bnn(model)
    if output_form not in ("auto", "affine", "table"):
        raise HyBNNError(f"Unknown output form {output_form!r}; use 'auto', 'affine' or 'table'.")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            hidden = tuple(_fold_hidden(lin, bn, i) for i, (lin, bn) in enumerate(zip(model.hidden, model.hidden_bn)))
            output = _fold_output(model.out, model.out_bn, output_form)
    finally:
        model.train(was_training)
    return DeployedBNN(config=model.config, hidden=hidden, output=output, meta=dict(meta or {}))


# ---------------------------------------------------------------- numpy engine
def _words(packed: np.ndarray) -> np.ndarray:
    """uint8 ``(..., nbytes)`` -> uint64 ``(..., ceil(nbytes / 8))``, zero-padded.

    The byte-to-word view is the machine's; input and weights go through the same view,
    so XOR and popcount do not depend on it.
    """
    nbytes = packed.shape[-1]
    width = -(-nbytes // 8) * 8
    padded = np.zeros((*packed.shape[:-1], width), dtype=np.uint8)
    padded[..., :nbytes] = packed
    return padded.view(np.uint64)


def check_codes(codes: np.ndarray, in_bits: int) -> np.ndarray:
    """Validate packed codes; return them as a C-contiguous uint8 ``(N, ceil(in_bits/8))`` array."""
    codes = np.asarray(codes)
    nbytes = packed_length(in_bits)
    if codes.ndim == 1:
        codes = codes[None, :]
    if codes.ndim != 2 or codes.shape[1] != nbytes:
        raise HyBNNError(
            f"Codes have shape {codes.shape}, but this model takes {in_bits}-bit codes packed into "
            f"{nbytes} bytes, shape (N, {nbytes}). Extract features with the same encoder the model was trained on."
        )
    if codes.dtype != np.uint8:
        raise HyBNNError(f"Codes have dtype {codes.dtype}; packed codes are uint8 (np.packbits, bitorder='{BIT_ORDER}').")
    codes = np.ascontiguousarray(codes)
    if in_bits % 8:  # padding bits carry no information; torch's unpacking ignores them too
        codes = codes.copy()
        codes[:, -1] &= np.uint8((0xFF << (8 - in_bits % 8)) & 0xFF)
    return codes


def _popcount_agree(x: np.ndarray, w: np.ndarray, n: int) -> np.ndarray:
    """``p`` = agreeing bits, int32 ``(N, units)``, from words ``x (N, k)`` and ``w (units, k)``."""
    d = np.zeros((x.shape[0], w.shape[0]), dtype=np.int32)
    for k in range(x.shape[1]):
        d += np.bitwise_count(x[:, k, None] ^ w[None, :, k])
    return n - d


def predict(model: DeployedBNN, codes: np.ndarray, batch_size: int = 8192) -> np.ndarray:
    """Class indices (int64 ``(N,)``) for packed codes uint8 ``(N, code_bytes)`` (or one code)."""
    codes = check_codes(codes, model.config.in_bits)
    layers = [(_words(l.weights), l.n_in, l.threshold.astype(np.int32), l.flip) for l in model.hidden]
    out_w = _words(model.output.weights)
    out = np.empty(len(codes), dtype=np.int64)
    for begin in range(0, len(codes), batch_size):
        chunk = codes[begin : begin + batch_size]
        x = _words(chunk)
        for w, n, t, flip in layers:
            p = _popcount_agree(x, w, n)
            fires = np.where(flip, p <= t, p >= t)
            x = _words(np.packbits(fires, axis=1, bitorder=BIT_ORDER))
        p = _popcount_agree(x, out_w, model.output.n_in)
        o = model.output
        if o.form == "affine":
            scores = o.scale.astype(np.int64) * p + o.offset.astype(np.int64)
        else:
            scores = o.table[np.arange(o.n_out), p]
        out[begin : begin + len(chunk)] = np.argmax(scores, axis=1)  # first max, as torch.argmax
    return out


# ---------------------------------------------------------------- npz file
def save_npz(model: DeployedBNN, path: Path | str) -> Path:
    """Write ``model`` as an npz (no pickle) with its format, config and sha256."""
    path = Path(path)
    make_dir(path.parent)
    header = {
        "format": EDGE_FORMAT,
        "format_version": EDGE_FORMAT_VERSION,
        "config": model.config.to_dict(),
        "output_form": model.output.form,
        "bit_order": BIT_ORDER,
        "sha256": model.digest(),
        "meta": model.meta,
    }
    buffer = io.BytesIO()
    np.savez(buffer, header=np.array(json.dumps(header)), **model.arrays())
    atomic_write_bytes(path, buffer.getvalue())
    return path


def load_npz(path: Path | str) -> DeployedBNN:
    """Load a model written by :func:`save_npz`; any damage is a :class:`HyBNNError`."""
    path = Path(path)
    fix = "Export it again with `hybnn export --format npz`."
    if not path.is_file():
        raise HyBNNError(f"{path} does not exist. {fix}")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as exc:
        raise HyBNNError(f"{path} is not a readable npz file ({exc}). {fix}") from exc
    try:
        header = json.loads(str(arrays.pop("header")))
        if header.get("format") != EDGE_FORMAT or header.get("format_version") != EDGE_FORMAT_VERSION:
            raise ValueError(f"format {header.get('format')!r} v{header.get('format_version')!r}, "
                             f"expected {EDGE_FORMAT!r} v{EDGE_FORMAT_VERSION}")
        config = BNNConfig.from_dict(header["config"])
        form = header["output_form"]
        widths = (config.in_bits, *config.hidden)
        hidden = tuple(
            HiddenLayer(n_in=widths[i], weights=arrays[f"hidden{i}.weights"],
                        threshold=arrays[f"hidden{i}.threshold"], flip=arrays[f"hidden{i}.flip"])
            for i in range(len(config.hidden))
        )
        output = OutputLayer(n_in=widths[-1], weights=arrays["out.weights"], form=form,
                             scale=arrays.get("out.scale"), offset=arrays.get("out.offset"),
                             table=arrays.get("out.table"))
        model = DeployedBNN(config=config, hidden=hidden, output=output, meta=header.get("meta", {}))
    except HyBNNError as exc:
        raise HyBNNError(f"{path}: {exc}") from exc
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        raise HyBNNError(f"{path} is not a HyBNN deployment model ({type(exc).__name__}: {exc}). {fix}") from exc
    if model.digest() != header.get("sha256"):
        raise HyBNNError(f"{path} fails its sha256 check: the file is corrupt or was edited. {fix}")
    return model


# ---------------------------------------------------------------- export entry point
def export_model(model_or_deployed: BNN | DeployedBNN | Path | str, out_dir: Path | str,
                 fmt: Literal["c", "npz"]) -> list[Path]:
    """Write the deployment form to ``out_dir``; return the files written.

    ``model_or_deployed``: a trained :class:`~common.bnn.model.BNN`, a :class:`DeployedBNN`, or
    the path of a BNN saved by :func:`common.bnn.store.save_bnn`. ``fmt``: ``"c"`` (a C99
    header and source, :mod:`common.edge.export_c`) or ``"npz"`` (for :func:`load_npz`).
    """
    if fmt not in ("c", "npz"):
        raise HyBNNError(f"Unknown export format {fmt!r}; use 'c' or 'npz'.")
    meta: dict = {}
    if isinstance(model_or_deployed, (str, Path)):
        from common.bnn.store import load_bnn

        model_or_deployed, sidecar = load_bnn(model_or_deployed)
        meta = {"source": sidecar.get("meta", {}), "weights_sha256": sidecar.get("weights_sha256")}
    deployed = model_or_deployed if isinstance(model_or_deployed, DeployedBNN) else to_deployment(model_or_deployed, meta=meta)
    out_dir = make_dir(out_dir)
    if fmt == "npz":
        return [save_npz(deployed, out_dir / NPZ_NAME)]
    from common.edge.export_c import write_c

    return write_c(deployed, out_dir)
