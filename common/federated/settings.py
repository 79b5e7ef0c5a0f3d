"""The federated run's settings, declared once.

Every setting of a FedHyBNN run is one :class:`Setting` in :data:`SETTINGS`: its
kebab-case key, type, default, help text, valid range or choices, who reads it, and the
``hybnn federate`` / ``deploy-local`` field that sets it. Everything else is made from
that list:

* the ServerApp's ``ServerSettings``, the ClientApp's ``ClientSettings`` and
  ``LocalRound`` (the per-round train config) are dataclasses made by
  :func:`settings_dataclass`, parsed by :func:`parse_settings`;
* ``FederateConfig`` (simulation/federate.py) takes its fields and defaults from the
  entries with a ``field``, and builds the run config with their keys;
* the ``federate`` / ``deploy-local`` options of the CLI are generated from the same
  entries (flag ``--`` + field, with ``_`` written ``-``);
* pyproject.toml's ``[tool.flwr.app.config]`` and the run-config table in
  docs/federated.md are checked against it (tests/test_settings.py), and printed from it
  with ``python -m common.federated.settings --pyproject`` / ``--markdown``.

Adding a setting is adding one entry (and its line in pyproject.toml and the docs, which
the tests ask for). This module imports neither torch nor flwr: the CLI's ``--help``
reads it.
"""

from __future__ import annotations

import difflib
import math
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, make_dataclass
from pathlib import Path
from typing import Any

from common.bnn.limits import DROPOUT_RESOLUTION, MAX_EPOCHS, MAX_LR, MIN_BATCH_SIZE, SEED_LIMIT, dropout_too_fine
from common.errors import HyBNNError

READERS = ("server", "client", "both")
SCOPES = ("run", "node", "command")


@dataclass(frozen=True)
class Setting:
    """One setting of a federated run."""

    key: str
    """kebab-case name: the run-config (or node-config) key."""
    type: type
    """``str``, ``int``, ``float`` or ``Path`` (a path: ``str`` in the run config)."""
    default: Any
    help: str
    reads: str = "server"
    """``server`` (the ServerApp), ``client`` (the ClientApp) or ``both``."""
    scope: str = "run"
    """``run``: a run-config key (pyproject.toml); ``node``: a SuperNode's own node config;
    ``command``: only ``hybnn federate`` / ``deploy-local`` (not sent to the apps)."""
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    above: float | None = None
    """Exclusive lower bound (``lr`` above 0)."""
    maximum: float | None = None
    below: float | None = None
    """Exclusive upper bound (``client-failure-rate`` below 1)."""
    validate: Callable[[Any], str | None] | None = None
    """A further check of a value within the range: why it is refused (a sentence), or None
    (``input-dropout``: the dropout mask's step)."""
    field: str | None = None
    """The ``FederateConfig`` field and CLI option (``--`` + field) that set it; None: neither."""
    cli: bool = True
    """With a ``field``: also a ``federate`` / ``deploy-local`` option."""
    per_round: bool = False
    """The server sends it to every client in each round's train config."""
    env: str | None = None
    """An environment variable that, when set, replaces the CLI option's default."""
    alone: str | None = None
    """The value the CLI option stands for when given without one (``--secure-aggregation``: on)."""

    @property
    def name(self) -> str:
        """The attribute name in ServerSettings / ClientSettings / LocalRound."""
        return self.key.replace("-", "_")

    @property
    def flag(self) -> str | None:
        """The CLI option, e.g. ``--rounds`` for ``num-server-rounds``."""
        return "--" + self.field.replace("_", "-") if self.field and self.cli else None

    def parse(self, raw: object, source: str = "Run config") -> Any:
        """``raw`` as this setting's type, checked; a :class:`HyBNNError` names the key and the fix."""
        where = f"{source} {self.key}={raw!r}"
        if raw is None and self.default is None:
            return None
        if isinstance(raw, bool) and {"on", "off"} <= set(self.choices):
            raw = "on" if raw else "off"  # TOML's true / false for an on / off choice
        if isinstance(raw, bool) or not isinstance(raw, (str, int, float, Path)):
            raise HyBNNError(f"{where} is a {type(raw).__name__}; expected {self.describe_type()}.")
        if self.type in (str, Path):
            value: Any = str(raw)
        elif self.type is int:
            if isinstance(raw, float) and not raw.is_integer():
                raise HyBNNError(f"{where} is not a whole number; expected {self.describe_type()}.")
            try:
                value = int(raw) if not isinstance(raw, str) else int(raw.strip())
            except (TypeError, ValueError, OverflowError):
                raise HyBNNError(f"{where} is not {self.describe_type()}.") from None
        else:
            try:
                value = float(raw)
            except (TypeError, ValueError):
                raise HyBNNError(f"{where} is not {self.describe_type()}.") from None
            if not math.isfinite(value):
                raise HyBNNError(f"{where} is not a finite number.")
        self.check(value, source, shown=raw)
        return value

    def check(self, value: Any, source: str = "Run config", shown: object = None) -> None:
        """Refuse a value outside the choices or the range (``shown``: the value as it was given)."""
        where = f"{source} {self.key}={value if shown is None else shown!r}"
        if self.choices and value not in self.choices:
            raise HyBNNError(f"{source} {self.key} {value!r} is unknown; use one of {', '.join(self.choices)}.")
        if self.minimum is not None and value < self.minimum:
            raise HyBNNError(f"{where} is below {self.minimum:g}; use {self.range_text()}.")
        if self.above is not None and not value > self.above:
            raise HyBNNError(f"{where} must be above {self.above:g}; use {self.range_text()}.")
        if self.maximum is not None and value > self.maximum:
            raise HyBNNError(f"{where} is above {self.maximum:g}; use {self.range_text()}.")
        if self.below is not None and not value < self.below:
            shown_bound = str(int(self.below)) if self.type is int else f"{self.below:g}"
            raise HyBNNError(f"{where} must be below {shown_bound}; use {self.range_text()}.")
        problem = self.validate(value) if self.validate is not None else None
        if problem:
            raise HyBNNError(f"{where}: {problem}.")

    def describe_type(self) -> str:
        return {str: "a string", Path: "a path (string)", int: "an integer", float: "a number"}[self.type]

    def range_text(self) -> str:
        """The valid values in words, e.g. ``an integer >= 1``."""
        parts = [self.describe_type()]
        if self.minimum is not None:
            parts.append(f">= {self.minimum:g}")
        if self.above is not None:
            parts.append(f"> {self.above:g}")
        if self.maximum is not None:
            parts.append(f"<= {self.maximum:g}")
        if self.below is not None:
            # an integer's exclusive bound as its largest value, in digits (2**32 - 1, not 4.29497e+09)
            parts.append(f"<= {int(self.below) - 1}" if self.type is int else f"< {self.below:g}")
        if self.choices:
            return "one of " + ", ".join(self.choices)
        return " ".join(parts)

    def toml_value(self) -> str:
        """The default as TOML writes it."""
        if isinstance(self.default, str):
            return '"' + self.default.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if self.type is float:
            return repr(float(self.default))
        return str(self.default)


SETTINGS: tuple[Setting, ...] = (
    # ---------------------------------------------------------------- what is learned, on what
    Setting("task", str, "4v5", "a named task (0v1, 2v3, 4v5, 6v7, 8v9, all10) or a spec of class groups such "
            "as 3v8 (docs/datasets.md)", reads="both", field="task", per_round=True),
    Setting("dataset", str, "mnist", "the data set: mnist, fashion-mnist, npz:PATH, folder:PATH or a registered "
            "name (docs/datasets.md); task is read against its classes", reads="both", field="dataset"),
    Setting("num-server-rounds", int, 20, "federated rounds", minimum=1, maximum=MAX_EPOCHS, field="rounds"),
    Setting("local-epochs", int, 3, "client epochs per round (docs/federated.md, Rounds to the centralized accuracy)",
            reads="both", minimum=1, maximum=MAX_EPOCHS, field="local_epochs", per_round=True),
    Setting("lr", float, 0.03, f"Adam learning rate of the clients, 0 < x <= {MAX_LR:g}", reads="both", above=0,
            maximum=MAX_LR, field="lr", per_round=True),
    Setting("lr-schedule", str, "exponential", "the clients' learning rate over the rounds: cosine, from lr in the "
            "first round to lr/100 in the last along a half cosine; exponential, from lr to lr/100 by the same "
            "factor every round; constant, lr in every round", choices=("cosine", "exponential", "constant"),
            field="lr_schedule"),
    Setting("lr-in-round", str, "constant", "the learning rate within a round: constant, the round's; decay, "
            "falling along a cosine to the next round's; anneal, falling along a cosine to a hundredth of the "
            "round's, so every client ends its round with settled signs", choices=("constant", "decay", "anneal"),
            field="lr_in_round"),
    Setting("batch-size", int, 64, "client batch size (at least 2: batch norm)", reads="both", minimum=MIN_BATCH_SIZE,
            field="batch_size", per_round=True),
    Setting("input-dropout", float, 0.2, "during local training each input bit of a batch is zeroed with this "
            f"probability, 0 <= x < 1, rounded to a multiple of 1/{DROPOUT_RESOLUTION} (one that rounds to 0 is "
            "refused; the centralized HyBNN recipe's regulariser; docs/federated.md)", reads="both", minimum=0, below=1,
            validate=dropout_too_fine, field="input_dropout", per_round=True),
    Setting("aggregation", str, "vote", "downlink: vote, the sign of the weighted mean of the clients' signs, "
            "1 bit per weight; or mean, that mean as int8 latent weights (docs/federated.md)",
            choices=("vote", "mean"), field="aggregation"),
    Setting("vote-latent-scale", float, 0.1, "latent magnitude a client gives the voted signs", reads="both",
            above=0, field="vote_latent_scale", cli=False, per_round=True),
    Setting("mean-latent-scale", float, 0.25, "mean mode: the clients restart from this multiple of the "
            "received mean, 0 < x <= 1; below 1, weights all clients agree on stay within reach of a sign flip "
            "(docs/scale.md)", reads="both", above=0, maximum=1, field="mean_latent_scale", per_round=True),
    Setting("bn-dtype", str, "float16", "batch-norm numbers on the wire", reads="both",
            choices=("float16", "float32"), per_round=True),
    Setting("bn-encoding", str, "thresholds", "batch norm on the wire: thresholds, each hidden unit's integer "
            "threshold and flip (the uplink as a change against the global model, at most 2 bits per unit) and "
            "the output batch norm's numbers; or floats, every batch-norm number in bn-dtype (docs/federated.md)",
            reads="both", choices=("thresholds", "floats"), field="bn_encoding", per_round=True),
    Setting("uplink-codec", str, "signs", "uplink: signs, every sign bit (1 bit per binary weight); or flips, "
            "only the signs changed against the received global model (docs/federated.md)", reads="both",
            choices=("signs", "flips"), field="uplink_codec", per_round=True),
    Setting("flip-blocks", int, 1, "flips uplink, from round 2 on: the binary weights are cut into this many "
            "contiguous blocks, and in each round the clients train, and so flip, only one of them (block round mod "
            "flip-blocks); 1: every weight in every round (docs/federated.md)", reads="both", minimum=1,
            maximum=25856, field="flip_blocks", per_round=True),
    Setting("flip-block-rounds", int, 0, "flips uplink: the last round that trains in flip blocks; from the next "
            "round on every weight trains again; 0: blocks in every round from round 2 (docs/federated.md)",
            reads="both", minimum=0, field="flip_block_rounds", per_round=True),
    Setting("flip-margin", float, 0.01, "flips uplink, from round 2 on: a client puts back every flip whose latent "
            "weight ended less than this far past zero; 0: none (docs/federated.md)", reads="both", minimum=0,
            maximum=1, field="flip_margin", per_round=True),
    # ---------------------------------------------------------------- files
    Setting("encoder-sha256", str, "", "the encoder every party must hold; empty: the hash of the server's "
            "encoder", reads="both", per_round=True),
    Setting("encoder-path", Path, "artifacts/encoder", "the frozen encoder artifact (written by `hybnn "
            "pretrain`): the server's, and the clients' unless their node config names one", reads="both",
            field="encoder"),
    Setting("data-root", Path, "data", "where the data sets and the feature cache live: the server's (test "
            "codes), and the clients' unless their node config names one", reads="both", field="data_root",
            env="HYBNN_DATA_ROOT"),
    Setting("out-dir", Path, "runs/fedhybnn", "where the ServerApp writes server.json, global/ and checkpoint/"),
    Setting("resume-dir", Path, "", "a folder with a checkpoint/ of this run: go on after its round"),
    # ---------------------------------------------------------------- who trains on what
    Setting("partition", str, "iid", "how the task's training data is split across the clients",
            reads="both", choices=("iid", "dirichlet"), field="partition"),
    Setting("dirichlet-alpha", float, 0.5, "Dirichlet concentration for partition dirichlet", reads="both",
            above=0, field="alpha"),
    Setting("seed", int, 0, "seed of the initial model, the partition and the clients' training, "
            "0 <= x < 2**32", reads="both", minimum=0, below=SEED_LIMIT, field="seed"),
    Setting("partition-id", int, 0, "this client's share of the data (a SuperNode's node config)",
            reads="client", scope="node", minimum=0),
    Setting("num-partitions", int, 1, "how many shares the data is split into (a SuperNode's node config)",
            reads="client", scope="node", minimum=1),
    # ---------------------------------------------------------------- rounds and failures
    Setting("min-available-nodes", int, 3, "nodes to wait for before each round: the planned federation, "
            "one node per partition 0..N-1; a reply for a partition outside them, or for one that another node "
            "holds, is left out (docs/security.md)", minimum=1),
    Setting("min-train-nodes", int, 1, "go on with this many nodes when the others do not come within "
            "node-wait-s", minimum=1),
    Setting("node-wait-s", float, 120.0, "how long to wait for min-available-nodes before going on with "
            "min-train-nodes", minimum=0),
    Setting("round-timeout-s", float, 600.0, "longest wait for the replies of one round; a sampled client "
            "that has not replied by then is left out of that round (docs/scale.md)", reads="both", above=0,
            field="round_timeout_s", per_round=True),
    Setting("clients-per-round", int, 0, "clients sampled for each round, drawn afresh each round from the "
            "connected nodes with the seed (0: every connected node; docs/scale.md)", minimum=0,
            field="clients_per_round"),
    Setting("client-failure-rate", float, 0.0, "testing aid: each sampled client fails its round (as "
            "client-failure-mode says) with this probability, drawn from the seed, the round and its partition (docs/scale.md)",
            reads="both", minimum=0, below=1, field="client_failure_rate", per_round=True),
    Setting("client-failure-mode", str, "error", "testing aid: how an injected failure shows: error, an error "
            "reply; hang, no reply in time: the client stays silent for 1.5 x round-timeout-s, so the server "
            "drops it as a straggler (docs/scale.md)", reads="both", choices=("error", "hang"),
            field="client_failure_mode", per_round=True),
    Setting("max-weight-vs-median", float, 1.25, "a client's weight is at most this multiple of the round's "
            "median num-examples (0: no cap; else >= 1); the cap also lowers honest clients that hold more "
            "data than most (docs/scale.md)", minimum=0, field="max_weight_vs_median"),
    Setting("max-num-examples", int, 0, "a client's weight is at most this many examples (0: no cap)",
            minimum=0),
    Setting("bn-aggregation", str, "median", "median (coordinate-wise, over the clients) or mean (weighted) of "
            "the batch-norm numbers; with secure-aggregation the weighted mean of the summed statistics, whatever "
            "this says (a median needs each client's numbers)", choices=("median", "mean")),
    # ---------------------------------------------------------------- secure aggregation
    Setting("secure-aggregation", str, "off", "on: the server learns only the sum of the round's updates, never "
            "one client's (SecAgg+; docs/security.md); clear: the same summable aggregation on updates sent in the "
            "clear, to compare; off: every update in the clear, aggregated as the settings above say",
            choices=("off", "on", "clear"), field="secure_aggregation", alone="on"),
    Setting("secure-threshold", int, 0, "secure aggregation: how many of a round's clients must remain to the end "
            "for its sum to be recovered; fewer: the round is skipped. 0: two thirds of the round's clients, "
            "rounded up (docs/security.md)", minimum=0, field="secure_threshold"),
    Setting("secure-group-size", int, 0, "secure aggregation: the round's clients in groups of this many (at "
            "least 3), a secure sum per group, and the model from the groups' sums by majority vote and median "
            "batch norm, so that a minority of clients moves no more than its groups; 0: one group, the whole "
            "round (docs/security.md)", minimum=0, field="secure_group_size"),
    Setting("sum-weight-bits", int, 4, "secure aggregation: a client's capped weight is scaled to 1 .. "
            "2**bits - 1 against the round's largest, so that the summed votes stay small integers "
            "(docs/security.md)", minimum=1, maximum=16),
    # ---------------------------------------------------------------- hybnn federate / deploy-local only
    Setting("clients", int, 3, "number of clients (the run config's min-available-nodes and the SuperNodes' "
            "num-partitions)", scope="command", minimum=1, field="clients"),
    Setting("threads", int, 1, "torch threads of each process, and the CPUs each simulated client holds "
            "(clients running at once: the machine's CPUs / threads; docs/scale.md)", scope="command",
            minimum=1, field="threads"),
    Setting("centralized-epochs", int, None, "epochs of the centralized reference (default: rounds x local "
            "epochs)", scope="command", minimum=1, field="centralized_epochs"),
    Setting("out", Path, "runs/federate", "output directory. The run writes into a new folder inside it and "
            "replaces the earlier results only once it has a round of its own. Ctrl-C stops it within seconds, "
            "keeps the rounds completed (status 'stopped') and exits 130", scope="command", field="out"),
    Setting("resume", Path, None, "go on with a stopped or crashed run from its last saved round: give the "
            "run's --out folder and the same options as the run that saved it", scope="command",
            field="resume"),
)

BY_KEY: dict[str, Setting] = {s.key: s for s in SETTINGS}
BY_FIELD: dict[str, Setting] = {s.field: s for s in SETTINGS if s.field}


def setting(key: str) -> Setting:
    return BY_KEY[key]


def default(key: str) -> Any:
    """The default of ``key`` (a path's as ``str``, as the run config has it)."""
    return BY_KEY[key].default


def run_settings() -> list[Setting]:
    """The run-config keys: pyproject.toml's ``[tool.flwr.app.config]``."""
    return [s for s in SETTINGS if s.scope == "run"]


def read_by(side: str) -> list[Setting]:
    """The settings ``side`` (server or client) reads from its run (and node) config. The
    client takes the per-round settings from each round's train config instead."""
    return [s for s in SETTINGS if s.scope != "command" and s.reads in (side, "both")
            and not (side == "client" and s.per_round)]


def per_round_settings() -> list[Setting]:
    """What the server sends the clients in each round's train config."""
    return [s for s in SETTINGS if s.per_round]


def command_settings() -> list[Setting]:
    """``FederateConfig``'s fields, in order."""
    return [s for s in SETTINGS if s.field]


def cli_default(s: Setting, overrides: Mapping[str, Any] | None = None) -> Any:
    """The CLI option's default: ``overrides`` (per subcommand), the environment, the schema."""
    import os

    value = (overrides or {}).get(s.key, s.default)
    if s.env and os.environ.get(s.env):
        value = os.environ[s.env]
    return Path(value) if s.type is Path and value is not None else value


def _field_type(s: Setting, paths: type) -> type:
    value_type = paths if s.type is Path else s.type
    return value_type | None if s.default is None else value_type  # type: ignore[return-value]


def settings_dataclass(name: str, entries: Iterable[Setting], base: type, *, paths: type = str,
                       extra: Iterable[tuple] = (), module: str | None = None, frozen: bool = True,
                       by_field: bool = False) -> type:
    """A frozen dataclass with one field per entry (``x-y`` is field ``x_y``), defaults from the
    entries, and the methods of ``base``; ``paths``: the type path settings get (``str`` or ``Path``).
    ``extra``: further ``(name, type, field(...))`` fields that are no settings (protocol values).
    ``by_field``: name the fields after the entries' ``field`` (``FederateConfig``)."""
    fields = []
    for s in entries:
        value = paths(s.default) if s.type is Path and s.default is not None else s.default
        fields.append((s.field if by_field else s.name, _field_type(s, paths), field(default=value)))
    namespace = {"__module__": module or base.__module__, "__doc__": base.__doc__}
    return make_dataclass(name, [*fields, *extra], bases=(base,), frozen=frozen, namespace=namespace)


def parse_settings(values: Mapping[str, object], entries: Iterable[Setting], source: str = "Run config",
                   *, unknown: str = "error", log=None, paths: type = str) -> dict[str, Any]:
    """``values`` (kebab-case keys) parsed against ``entries``, as keyword arguments (``x_y``).

    Keys that are no setting at all are refused (``unknown="error"``: a :class:`HyBNNError`
    naming the key and the nearest known one), or logged with ``log`` and left out
    (``unknown="log"``), or left out (``unknown="ignore"``). Keys of settings not in ``entries``
    (read by the other side) pass. ``paths``: the type path settings get (``str`` or ``Path``)."""
    entries = list(entries)
    wanted = {s.key: s for s in entries}
    parsed: dict[str, Any] = {}
    for key, raw in values.items():
        if key in wanted:
            value = wanted[key].parse(raw, source)
            parsed[wanted[key].name] = paths(value) if wanted[key].type is Path and value is not None else value
        elif key not in BY_KEY or BY_KEY[key].scope == "command":
            near = difflib.get_close_matches(str(key), [s.key for s in SETTINGS if s.scope != "command"], n=1)
            hint = f" Did you mean {near[0]!r}?" if near else ""
            message = (f"{source} key {key!r} is not a FedHyBNN setting.{hint} The settings are listed in "
                       "docs/federated.md.")
            if unknown == "error":
                raise HyBNNError(message)
            if log is not None:
                log(message + " It is ignored.")
    return parsed


def secure_aggregation_refusal(values: Mapping[str, Any]) -> str | None:
    """Why the settings ``values`` (kebab-case keys; missing ones take their defaults) cannot run with
    secure aggregation, in one paragraph, or None. Secure aggregation is never weakened to fit
    another setting: the run is refused before it starts."""
    get = lambda key: values.get(key, BY_KEY[key].default)  # noqa: E731
    if get("secure-aggregation") == "off":
        return None
    problems = []
    if get("uplink-codec") == "flips":
        problems.append("uplink-codec flips sends only the signs a client changed, which the server must compare "
                        "with the global model one client at a time; a secure sum needs every client's votes "
                        "(use uplink-codec signs)")
    if get("bn-encoding") != "thresholds":
        problems.append(f"bn-encoding {get('bn-encoding')} sends float batch-norm numbers; the summed statistics "
                        "are the hidden units' thresholds (use bn-encoding thresholds)")
    per_round = get("clients-per-round") or get("min-available-nodes")
    if per_round < 3:
        problems.append(f"a round of {per_round} client(s) cannot hide one client's update from the others: with "
                        "two, each can subtract its own from the sum (use at least 3 clients per round)")
    threshold = get("secure-threshold")
    if threshold and threshold > per_round:
        problems.append(f"secure-threshold {threshold} is more than the {per_round} clients of a round, so no round "
                        "could end (use at most the clients per round, or 0 for two thirds of them)")
    group = get("secure-group-size")
    if 0 < group < 3:
        problems.append(f"secure-group-size {group} cannot hide one client of a group from the other (use at least "
                        "3, or 0 for one group)")
    if group and threshold and threshold > group:
        problems.append(f"secure-threshold {threshold} is more than a secure group's {group} clients (with groups "
                        "it counts per group; use at most secure-group-size)")
    if threshold == 1:
        problems.append("secure-threshold 1 would let any one client's shares unmask the others (use at least 2, "
                        "or 0 for two thirds of the round)")
    if not problems:
        return None
    return (f"secure-aggregation {get('secure-aggregation')} cannot run with these settings: "
            + "; ".join(problems) + ". docs/security.md says what secure aggregation protects and what it needs.")


# ------------------------------------------------------------------ printed forms
def pyproject_block() -> str:
    """pyproject.toml's ``[tool.flwr.app.config]`` table, from the schema."""
    return "\n".join(["[tool.flwr.app.config]", *(f"{s.key} = {s.toml_value()}" for s in run_settings())])


def markdown_default(s: Setting) -> str:
    """A default as docs/federated.md's table shows it."""
    if isinstance(s.default, str):
        return f'`"{s.default}"`'
    return f"`{s.toml_value()}`"


def markdown_table() -> str:
    """docs/federated.md's run-config table, from the schema."""
    rows = ["| key | default | read by | meaning |", "|---|---|---|---|"]
    for s in run_settings():
        meaning = s.help + (f" ({', '.join(s.choices)})" if s.choices and not all(c in s.help for c in s.choices)
                            else "")
        reads = "server, sent to the clients each round" if s.per_round else s.reads
        rows.append(f"| `{s.key}` | {markdown_default(s)} | {reads} | {meaning} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args == ["--pyproject"]:
        print(pyproject_block())
    elif args == ["--markdown"]:
        print(markdown_table())
    else:
        print("usage: python -m common.federated.settings --pyproject | --markdown", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
