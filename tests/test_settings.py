"""One schema for the federated settings (common/federated/settings.py): every place that declares
or reads them agrees with it, and a bad value is refused with a message naming its key."""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from common.federated import settings
from common.errors import HyBNNError
from common.federated.settings import SETTINGS, Setting
from tests.conftest import REPO_ROOT


def _value_type(s: Setting) -> type:
    return str if s.type is Path else s.type


def _fields(cls) -> dict:
    return {f.name: f for f in dataclasses.fields(cls)}


# ------------------------------------------------------------------ the schema itself
def test_the_schema_is_well_formed():
    assert len({s.key for s in SETTINGS}) == len(SETTINGS)
    assert len({s.field for s in SETTINGS if s.field}) == len([s for s in SETTINGS if s.field])
    for s in SETTINGS:
        assert s.reads in settings.READERS and s.scope in settings.SCOPES, s.key
        assert s.type in (str, int, float, Path), s.key
        assert s.help and "%" not in s.help, s.key  # argparse formats help with %
        if s.default is not None:
            assert type(s.default) is _value_type(s), s.key
            s.check(s.default)  # a default inside its own range
        if s.per_round:
            assert s.scope == "run" and s.reads == "both", s.key


def test_choices_and_defaults_agree_with_the_modules_that_use_them():
    from common.data import partition
    from common.federated import aggregation, codec, flipcodec, robust

    assert settings.setting("aggregation").choices == aggregation.MODES
    assert settings.default("aggregation") == aggregation.DEFAULT_MODE
    assert settings.default("vote-latent-scale") == aggregation.DEFAULT_VOTE_LATENT_SCALE
    assert settings.default("mean-latent-scale") == aggregation.DEFAULT_MEAN_LATENT_SCALE
    from client.client_app import FAILURE_MODES

    assert settings.setting("client-failure-mode").choices == FAILURE_MODES
    assert settings.default("client-failure-mode") == FAILURE_MODES[0]
    assert settings.setting("bn-dtype").choices == tuple(codec.BN_DTYPES)
    assert settings.setting("uplink-codec").choices == flipcodec.UPLINK_CODECS
    assert settings.setting("partition").choices == partition.SCHEMES
    assert settings.setting("bn-aggregation").choices == robust.BN_AGGREGATIONS
    assert settings.default("bn-aggregation") == robust.DEFAULT_BN_AGGREGATION
    assert settings.default("max-weight-vs-median") == robust.DEFAULT_MAX_WEIGHT_VS_MEDIAN


# ------------------------------------------------------------------ pyproject.toml and the docs
def test_pyproject_run_config_agrees_with_the_schema():
    table = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    expected = {s.key: s for s in settings.run_settings()}
    assert set(table) == set(expected), f"missing {set(expected) - set(table)}, extra {set(table) - set(expected)}"
    for key, value in table.items():
        s = expected[key]
        assert type(value) is _value_type(s) and value == s.default, (key, value, s.default)
    # What `python -m common.federated.settings --pyproject` prints is the same table.
    printed = tomllib.loads(settings.pyproject_block())["tool"]["flwr"]["app"]["config"]
    assert printed == table


def test_the_docs_run_config_table_is_the_schema_s():
    text = (REPO_ROOT / "docs" / "federated.md").read_text()
    assert settings.markdown_table() in text, "regenerate it: python -m common.federated.settings --markdown"
    for s in settings.run_settings():
        assert f"| `{s.key}` | {settings.markdown_default(s)} |" in text, s.key
    node_section = text[text.index("Node config, per SuperNode"):]
    for s in settings.read_by("client"):
        assert f"`{s.key}`" in node_section.split("\n\n")[0], s.key


def test_the_module_prints_the_pyproject_block_without_torch_or_flwr():
    code = ("import sys, runpy; sys.argv = ['x', '--pyproject']\n"
            "try:\n    runpy.run_module('common.federated.settings', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'flwr') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("[tool.flwr.app.config]\n") and proc.stdout.rstrip().endswith("[]")


# ------------------------------------------------------------------ the apps' settings
def test_server_settings_are_the_schema_s():
    from server.server_app import ServerSettings

    fields = _fields(ServerSettings)
    assert list(fields) == [s.name for s in settings.read_by("server")]
    for s in settings.read_by("server"):
        assert fields[s.name].default == s.default and fields[s.name].type in (_value_type(s), _value_type(s).__name__)
    # Every run-config key is read by the server (it records them all in server.json).
    assert {s.key for s in settings.run_settings()} <= {s.key for s in settings.read_by("server")}


def test_client_settings_and_local_round_are_the_schema_s():
    from client.client_app import ClientSettings, LocalRound
    from server.server_app import ServerSettings

    fields = _fields(ClientSettings)
    assert list(fields) == [s.name for s in settings.read_by("client")]
    for s in settings.read_by("client"):
        expected = Path(s.default) if s.type is Path else s.default
        assert fields[s.name].default == expected, s.key
    round_fields = _fields(LocalRound)
    for s in settings.per_round_settings():
        assert round_fields[s.name].default == s.default, s.key
    # What the server sends each round is what the client reads, key for key.
    sent = ServerSettings(lr=0.01, uplink_codec="flips").train_config("ab" * 32)
    assert set(sent) == {s.key for s in settings.per_round_settings()} | {"codec-version"}
    received = LocalRound.from_config(sent)
    assert (received.lr, received.uplink_codec, received.encoder_sha256) == (0.01, "flips", "ab" * 32)


def test_federate_config_defaults_and_run_config_are_the_schema_s():
    from server.server_app import ServerSettings
    from simulation.deploy_local import DeployConfig
    from simulation.federate import FederateConfig

    fields = _fields(FederateConfig)
    for s in settings.command_settings():
        expected = Path(s.default) if s.type is Path and s.default is not None else s.default
        assert fields[s.field].default == expected, s.key
    for config in (FederateConfig(clients=2, rounds=3, alpha=0.25),
                   DeployConfig(clients=2, min_nodes=2, node_wait_s=5.0, round_timeout_s=9.0)):
        run_config = config.run_config("ab" * 32)
        assert set(run_config) <= {s.key for s in settings.run_settings()}
        parsed = ServerSettings.from_run_config(run_config)  # unknown keys would raise
        for s in settings.command_settings():
            if s.scope == "run" and s.type is not Path and s.key != "dataset":
                assert getattr(parsed, s.name) == getattr(config, s.field), s.key
        assert parsed.min_available_nodes == 2
    deployed = ServerSettings.from_run_config(DeployConfig(clients=2, min_nodes=2, node_wait_s=5.0,
                                                           round_timeout_s=9.0).run_config("ab" * 32))
    assert (deployed.min_train_nodes, deployed.node_wait_s, deployed.round_timeout_s) == (2, 5.0, 9.0)


def test_deploy_local_node_config_uses_the_client_s_keys(tmp_path):
    import shlex

    from client.client_app import ClientSettings
    from flwr.app import Context, RecordDict
    from simulation.deploy_local import node_config

    text = node_config(1, 3, tmp_path / "enc", tmp_path / "data")
    pairs = dict(part.split("=", 1) for part in shlex.split(text))
    assert set(pairs) <= {s.key for s in settings.read_by("client")}
    ctx = Context(run_id=1, node_id=1, state=RecordDict(), run_config={},
                  node_config={k: int(v) if v.isdigit() else v for k, v in pairs.items()})
    client = ClientSettings.from_context(ctx)
    assert (client.partition_id, client.num_partitions, client.encoder_path) == (1, 3, (tmp_path / "enc").resolve())


# ------------------------------------------------------------------ the command line
@pytest.mark.parametrize("command, out", [("federate", "runs/federate"), ("deploy-local", "runs/deploy-local")])
def test_cli_options_are_the_schema_s(command, out, monkeypatch):
    from common.experiments.profiles import PROFILES
    from simulation.cli import _federation_settings, build_parser
    from simulation.federate import FederateConfig

    monkeypatch.delenv("HYBNN_DATA_ROOT", raising=False)
    parser = build_parser()
    args = parser.parse_args([command])
    values = _federation_settings(args)
    if command == "deploy-local":
        from simulation.deploy_local import DeployConfig

        defaults = DeployConfig()  # its own, shorter round timeout: the SuperNodes are local processes
    else:
        defaults = FederateConfig()
    for s in settings.command_settings():
        if not s.flag:
            continue
        expected = Path(out) if s.key == "out" else getattr(defaults, s.field)
        assert values[s.field] == expected and type(values[s.field]) is type(expected), s.key
    # The paper's profile and the CLI's defaults are one experiment.
    paper = PROFILES["paper"]
    assert (paper.fed_clients, paper.fed_rounds, paper.fed_local_epochs) == (
        defaults.clients, defaults.rounds, defaults.local_epochs)
    # --help states each option with its default.
    sub = next(a for a in parser._subparsers._group_actions[0].choices.items() if a[0] == command)[1]
    help_text = " ".join(sub.format_help().split())
    for s in settings.command_settings():
        if s.flag:
            assert s.flag in help_text, s.flag
            if s.default is not None:
                shown = out if s.key == "out" else getattr(defaults, s.field)
                assert f"(default: {shown}" in help_text, s.flag


def test_cli_option_values_reach_the_run_config():
    from simulation.cli import _federation_settings, build_parser
    from simulation.federate import FederateConfig

    args = build_parser().parse_args(["federate", "--rounds", "7", "--alpha", "0.2", "--partition", "dirichlet",
                                      "--uplink-codec", "flips", "--local-epochs", "3", "--seed", "5"])
    run_config = FederateConfig(**_federation_settings(args)).run_config("ab" * 32)
    assert {k: run_config[k] for k in ("num-server-rounds", "dirichlet-alpha", "partition", "uplink-codec",
                                        "local-epochs", "seed")} == {
        "num-server-rounds": 7, "dirichlet-alpha": 0.2, "partition": "dirichlet", "uplink-codec": "flips",
        "local-epochs": 3, "seed": 5}


def test_federate_help_imports_neither_torch_nor_flwr():
    code = ("import sys\nfrom simulation.cli import main\n"
            "try:\n    main(['federate', '--help'])\nexcept SystemExit:\n    pass\n"
            "print('IMPORTED', sorted(m for m in ('torch', 'flwr') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "IMPORTED []" in proc.stdout


# ------------------------------------------------------------------ bad values
@pytest.mark.parametrize("run_config, expected", [
    ({"num-server-rounds": "many"}, "num-server-rounds='many' is not an integer"),
    ({"num-server-rounds": 2.5}, "num-server-rounds=2.5 is not a whole number"),
    ({"local-epochs": True}, "local-epochs=True is a bool"),
    ({"local-epochs": 20000}, "local-epochs=20000 is above 10000"),
    ({"num-server-rounds": 10**9}, "num-server-rounds=1000000000 is above 10000"),
    ({"lr": float("nan")}, "lr=nan is not a finite number"),
    ({"lr": 0}, "lr=0 must be above 0"),
    ({"lr": 50}, "lr=50 is above 10; use a number > 0 <= 10"),
    ({"input-dropout": 0.001}, "input-dropout=0.001: the dropout mask drops in steps of 1/256, so it would drop "
                               "nothing. Pass 0 (no dropout) or at least 0.0039"),
    ({"batch-size": 1}, "batch-size=1 is below 2"),
    ({"dirichlet-alpha": -0.5}, "dirichlet-alpha=-0.5 must be above 0"),
    ({"min-available-nodes": 0}, "min-available-nodes=0 is below 1"),
    ({"aggregation": "median"}, "aggregation 'median' is unknown; use one of vote, mean"),
    ({"bn-dtype": "int8"}, "bn-dtype 'int8' is unknown"),
    ({"mean-latent-scale": 0}, "mean-latent-scale=0 must be above 0"),
    ({"mean-latent-scale": 1.5}, "mean-latent-scale=1.5 is above 1"),
    ({"client-failure-mode": "crash"}, "client-failure-mode 'crash' is unknown; use one of error, hang"),
    ({"num-server-round": 5}, "key 'num-server-round' is not a FedHyBNN setting. Did you mean 'num-server-rounds'?"),
    ({"alpha": 0.5}, "key 'alpha' is not a FedHyBNN setting"),
    ({"clients": 3}, "key 'clients' is not a FedHyBNN setting"),  # an option of the command, not of the run
])
def test_the_server_refuses_a_bad_run_config_naming_the_key(run_config, expected):
    from server.server_app import ServerSettings

    with pytest.raises(HyBNNError) as caught:
        ServerSettings.from_run_config(run_config)
    assert expected in str(caught.value)


def test_the_server_accepts_what_flower_hands_it():
    from server.server_app import ServerSettings

    # TOML gives ints where a float is meant (node-wait-s = 120) and a run config given as strings
    # ("--run-config 'seed=\"3\"'") is read as its number.
    parsed = ServerSettings.from_run_config({"node-wait-s": 120, "seed": "3", "num-server-rounds": 4.0})
    assert (parsed.node_wait_s, parsed.seed, parsed.num_server_rounds) == (120.0, 3, 4)
    assert isinstance(parsed.node_wait_s, float)


def test_the_client_refuses_a_bad_node_config_naming_the_key_and_logs_an_unknown_one(caplog):
    from client.client_app import ClientSettings
    from flwr.app import Context, RecordDict

    def context(node_config: dict) -> Context:
        return Context(run_id=1, node_id=1, state=RecordDict(), run_config={"num-server-rounds": 3},
                       node_config=node_config)

    with pytest.raises(HyBNNError, match="Node config partition-id='x' is not an integer.*--node-config"):
        ClientSettings.from_context(context({"partition-id": "x", "num-partitions": 3}))
    with pytest.raises(HyBNNError, match="num-partitions=0 is below 1"):
        ClientSettings.from_context(context({"partition-id": 0, "num-partitions": 0}))
    with pytest.raises(HyBNNError, match="partition 'shards' is unknown"):
        ClientSettings.from_context(context({"partition": "shards"}))
    with caplog.at_level(logging.WARNING, logger="hybnn.client"):
        client = ClientSettings.from_context(context({"partition-id": 1, "num-partitons": 3}))
    assert client.partition_id == 1 and client.num_partitions == 1
    assert "'num-partitons' is not a FedHyBNN setting. Did you mean 'num-partitions'?" in caplog.text


def test_the_client_refuses_a_bad_train_config_naming_the_key():
    from client.client_app import LocalRound
    from server.server_app import ServerSettings

    sent = dict(ServerSettings().train_config("ab" * 32))
    with pytest.raises(HyBNNError, match="train config batch-size='big' is not an integer"):
        LocalRound.from_config({**sent, "batch-size": "big"})
    with pytest.raises(HyBNNError, match="it lacks lr"):
        LocalRound.from_config({k: v for k, v in sent.items() if k != "lr"})


def test_federate_refuses_a_setting_outside_its_choices_before_the_run():
    from simulation.federate import FederateConfig, check_config

    with pytest.raises(HyBNNError, match="uplink-codec 'gzip' is unknown; use one of signs, flips"):
        check_config(FederateConfig(uplink_codec="gzip"))
    with pytest.raises(HyBNNError, match="partition 'shards' is unknown"):
        check_config(FederateConfig(partition="shards"))


# ------------------------------------------------------------------ the training loop's own limits
@pytest.mark.parametrize("key, field_name, values", [
    ("lr", "lr", [1e-6, 0.03, 10.0, 10.000001, 50.0, 1e308]),
    ("input-dropout", "input_dropout", [0.0, 1e-9, 0.001, 0.0019, 0.002, 1 / 256, 0.2, 0.99]),
])
def test_the_schema_refuses_what_the_training_loop_refuses(key, field_name, values):
    """A value every client's training would refuse in every round is refused at launch instead."""
    from common.bnn.training import TrainConfig

    refused = {True: [], False: []}
    for value in values:
        try:
            TrainConfig(**{field_name: value})
            trains = True
        except HyBNNError:
            trains = False
        try:
            settings.setting(key).parse(value)
            parses = True
        except HyBNNError:
            parses = False
        assert parses == trains, (key, value, parses, trains)
        refused[trains].append(value)
    assert refused[True] and refused[False]  # the probe covers both sides of the limit


@pytest.mark.parametrize("command", ["federate", "deploy-local"])
@pytest.mark.parametrize("option, value, expected", [
    ("--lr", "50", "at most 10"),
    ("--input-dropout", "0.001", "would drop nothing"),
])
def test_federate_and_deploy_local_refuse_the_training_loop_s_limits_at_launch(command, option, value, expected,
                                                                             capsys, tmp_path, monkeypatch):
    from simulation import deploy_local, federate
    from simulation.cli import main

    monkeypatch.setattr(federate, "check_simulation_memory", lambda *a: pytest.fail("the run started"))
    monkeypatch.setattr(deploy_local, "_deploy_local", lambda *a: pytest.fail("the run started"))
    rc = main([command, option, value, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert f"hybnn {command}: error:" in err and expected in err, err
    assert not (tmp_path / "out").exists()
