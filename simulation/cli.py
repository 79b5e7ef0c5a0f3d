"""The ``hybnn`` command line.

Each subcommand parses its options, then calls plain library functions: the
centralized pipeline in ``common/``, the federated runs in ``simulation/``.
Heavy imports (torch, flwr) happen inside the handlers, so ``--help`` is instant.
A :class:`~common.errors.HyBNNError` ends the program with its message and exit
status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from common.errors import HyBNNError
from common.experiments.profiles import PROFILES
from common.federated.settings import default as default_setting
from common.data.tasks import TASKS
from simulation.netns import DEFAULT_NETWORK, NETWORKS

DEFAULT_ENCODER = Path(default_setting("encoder-path"))


# ------------------------------------------------------------------ option types
def _number_option(convert: Callable[[str], float], accept: Callable[[float], bool],
                   wanted: str) -> Callable[[str], float]:
    """An argparse ``type`` that converts, checks and names what it wanted in its error."""

    def parse(text: str) -> float:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}") from None
        if not accept(value):  # NaN fails every comparison, so it is refused too
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {value}")
        return value

    return parse


positive_int = _number_option(int, lambda v: v >= 1, "a positive integer")
positive_float = _number_option(float, lambda v: 0 < v < math.inf, "a positive finite number")
non_negative_float = _number_option(float, lambda v: 0 <= v < math.inf, "a finite number >= 0")
probability_below_one = _number_option(float, lambda v: 0 <= v < 1,
                                       "a number from 0 up to (not including) 1")


def path_arg(text: str) -> Path:
    """A file or folder path; an empty one (an unset shell variable) would mean the current folder."""
    if not text:
        raise argparse.ArgumentTypeError("expected a path, got an empty string (an unset variable?)")
    return Path(text)


def hidden_sizes(text: str) -> tuple[int, ...]:
    """``"128"`` or ``"256,128"``: one binary hidden layer per number."""
    try:
        sizes = tuple(positive_int(part) for part in text.split(","))
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive layer widths such as 128 or 256,128, got {text!r}"
        ) from None
    return sizes


def task_spec(text: str) -> str:
    """A named task or a spec of class groups; checked against the data set's classes later."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a task name or a spec such as 3v8, 0,2,4v1,3,5 or 3,5,8")
    return text.strip()


def task_name(text: str) -> str:
    if text not in TASKS:
        raise argparse.ArgumentTypeError(f"unknown task {text!r}; valid tasks: {', '.join(TASKS)}")
    return text


def _add_data_root(p: argparse.ArgumentParser) -> None:
    from common.data.mnist import DEFAULT_DATA_ROOT

    p.add_argument("--data-root", type=path_arg, default=DEFAULT_DATA_ROOT,
                   help="where MNIST, Fashion-MNIST and the feature cache live (default: %(default)s, "
                        "or $HYBNN_DATA_ROOT)")


def dataset_arg(text: str) -> str:
    """A data set name; the path of ``npz:PATH`` / ``folder:PATH`` must not be empty (an unset variable)."""
    name = text.strip()
    if not name:
        raise argparse.ArgumentTypeError("expected a data set name such as mnist, fashion-mnist, npz:PATH "
                                         "or folder:PATH, got an empty string (an unset variable?)")
    for part in name.split("+"):
        for prefix in ("npz:", "folder:"):
            if part.strip().startswith(prefix) and not part.strip()[len(prefix):].split("@")[0]:
                raise argparse.ArgumentTypeError(f"{prefix}PATH needs a path, got {part.strip()!r} "
                                                 "(an unset variable?)")
    return name


def _add_dataset(p: argparse.ArgumentParser, union: bool = False) -> None:
    p.add_argument("--dataset", type=dataset_arg, default="mnist", metavar="NAME",
                   help="mnist, fashion-mnist, npz:PATH, folder:PATH or a registered name"
                        + (", or a union A+B of data sets of one shape" if union else "")
                        + " (default: %(default)s; docs/datasets.md)")
    p.add_argument("--image-size", default=None, metavar="HxW",
                   help="resize the data set's images to this size (N or HxW, 1 to 1024 a side); images are never "
                        "resized otherwise (default: none)")


def _dataset(args: argparse.Namespace) -> str:
    """The data set name with the --image-size request folded in (name@HxW)."""
    from common.data.datasets import with_image_size

    return with_image_size(args.dataset, args.image_size)


def check_out(path: Path, what: str = "--out") -> Path:
    """Every command that writes checks its output folder first, so a bad one fails in seconds."""
    from common.fileio import check_output_dir

    return check_output_dir(path, what)


def _add_encoder(p: argparse.ArgumentParser) -> None:
    p.add_argument("--encoder", type=path_arg, default=DEFAULT_ENCODER,
                   help="encoder artifact directory written by `hybnn pretrain` (default: %(default)s)")


# ------------------------------------------------------------------ handlers
def cmd_data(args: argparse.Namespace) -> None:
    from common.data.mnist import ensure_mnist
    from common.data.datasets import get_dataset

    if args.dataset == "mnist" and args.image_size is None:
        print(f"MNIST is ready under {ensure_mnist(args.data_root)}")
        return
    data = get_dataset(_dataset(args))
    x_train, _, x_test, _ = data.load_all(args.data_root)
    print(f"{data.name}: {len(x_train)} training and {len(x_test)} test images of shape {data.shape} "
          f"(H, W, C), {data.num_classes} classes ({', '.join(data.class_names)}); fingerprint "
          f"{data.fingerprint(args.data_root)}")


def cmd_pretrain(args: argparse.Namespace) -> None:
    from common.data.datasets import pretrain_images
    from common.encoder.artifact import MANIFEST_FILE, WEIGHTS_FILE, save_encoder_artifact
    from common.fileio import keeping_earlier
    from common.encoder.vae import VAEConfig, VAETrainConfig, train_vae

    check_out(args.out)
    train_config = VAETrainConfig(epochs=args.epochs, seed=args.seed, input_shift=args.input_shift,
                                  input_rotation=args.input_rotation, input_mask=args.input_mask)
    images, datasets, data_sha = pretrain_images(args.dataset, args.data_root, args.image_size)
    print(f"Pretraining on {' + '.join(d.name for d in datasets)}: {len(images)} images of shape "
          f"{datasets[0].shape} (H, W, C)")
    options = {key: value for key, value in (("kl_weight", args.kl_weight), ("variant", args.variant),
                                             ("code_rotation", args.code_rotation)) if value is not None}
    vae, history = train_vae(images, VAEConfig(image_shape=datasets[0].shape, **options), train_config)
    with keeping_earlier(args.out, (MANIFEST_FILE, WEIGHTS_FILE)) as kept:
        artifact = save_encoder_artifact(
            vae, args.out, data_sha256=data_sha, train_config=train_config.to_dict(), history=history,
            datasets=[d.name for d in datasets],
            data_fingerprints={d.name: d.fingerprint(args.data_root) for d in datasets})
    if kept is not None:
        print(f"The earlier encoder in {args.out} is kept in {kept}")
    print(f"Frozen encoder written to {artifact.path} (sha256 {artifact.sha256})")


def cmd_upgrade_encoder(args: argparse.Namespace) -> None:
    from common.encoder.artifact import artifact_dir, upgrade_encoder_artifact

    check_out(args.out or artifact_dir(args.encoder), "--out" if args.out else "DIR")
    upgrade = upgrade_encoder_artifact(args.encoder, args.out)
    if not upgrade.upgraded:
        print(f"The encoder {upgrade.path} already records its fields in its weights file (sha256 "
              f"{upgrade.old_sha256}); nothing was written.")
        return
    print(f"Encoder upgraded: sha256 {upgrade.old_sha256} (old) -> {upgrade.new_sha256} (new), written to "
          f"{upgrade.path}. The tensors and codes are unchanged.")
    if upgrade.kept is not None:
        print(f"The earlier files are kept in {upgrade.kept}")
    print("Feature caches, checkpoints and models name the encoder by its sha256: the codes are computed "
          "again once under the new one (the same codes), and a federated run checkpointed with the old "
          "sha256 cannot be resumed with the new one.")


def cmd_extract(args: argparse.Namespace) -> None:
    from common.encoder.artifact import load_encoder_artifact
    from common.encoder.features import load_codes

    artifact = load_encoder_artifact(args.encoder)
    for split in ("train", "test"):
        codes, _ = load_codes(artifact, args.data_root, split, dataset=_dataset(args))
        print(f"{split}: {codes.shape[0]} codes of {codes.shape[1]} bytes")


def cmd_train(args: argparse.Namespace) -> None:
    from common.bnn.product import product_choice
    from common.bnn.store import META_NAME, WEIGHTS_NAME, save_bnn
    from common.fileio import keeping_earlier
    from common.encoder.artifact import load_encoder_artifact
    from common.bnn.pipeline import train_hybnn
    from common.data.tasks import task_for_dataset
    from dataclasses import replace

    from common.bnn.pipeline import HYBNN_TRAIN_CONFIG  # --help states its defaults; tests/test_cli.py keeps them in step

    dataset = _dataset(args)
    task = task_for_dataset(args.task, dataset)
    out = check_out(args.out or Path("runs") / f"bnn-{task.slug}")
    config = replace(HYBNN_TRAIN_CONFIG, epochs=args.epochs, seed=args.seed,
                     lr=args.lr or HYBNN_TRAIN_CONFIG.lr,
                     batch_size=args.batch_size or HYBNN_TRAIN_CONFIG.batch_size,
                     input_dropout=HYBNN_TRAIN_CONFIG.input_dropout if args.input_dropout is None
                     else args.input_dropout)
    artifact = load_encoder_artifact(args.encoder)
    print(product_choice().describe(), flush=True)
    run = train_hybnn(artifact, task, args.data_root, config, hidden=args.hidden, dataset=dataset)
    with keeping_earlier(out, (META_NAME, WEIGHTS_NAME)) as kept:
        save_bnn(run.model, out, meta={"task": task.name, "dataset": dataset,
                                       "class_names": list(task.class_names), "groups": task.to_dict()["groups"],
                                       "encoder_sha256": artifact.sha256,
                                       "test_acc": run.test_acc, "train": config.to_dict(),
                                       "train_seconds": run.train.seconds})
    if kept is not None:
        print(f"The earlier model in {out} is kept in {kept}")
    print(f"HyBNN {task.name}: test accuracy {run.test_acc:.4f} after {config.epochs} epochs "
          f"({run.train.seconds:.1f} s). Model written to {out}")


def cmd_baseline(args: argparse.Namespace) -> None:
    from common.experiments.baselines import train_baseline

    result = train_baseline(args.model, args.task, epochs=args.epochs, data_root=args.data_root,
                            seed=args.seed, dataset=_dataset(args))
    print(f"{args.model} {args.task}: test accuracy {result['test_acc']:.4f} "
          f"after {result['epochs']} epochs ({result['train_seconds']:.1f} s)")


def cmd_reproduce(args: argparse.Namespace) -> None:
    from simulation.reproduce import reproduce
    from simulation.runs import StopSignals

    check_out(args.out)
    if args.encoder_dir is not None:
        check_out(args.encoder_dir, "--encoder-dir")
    with StopSignals():  # SIGTERM, like Ctrl-C, ends the run through its clean-up of the staging folder
        reproduce(profile=args.profile, out_dir=args.out, data_root=args.data_root,
                  encoder_dir=args.encoder_dir, tasks=args.tasks, federated=not args.no_federated)


def cmd_continual(args: argparse.Namespace) -> None:
    import shlex

    from common.bnn.continual import ContinualConfig, run_continual, split_task_list, write_outputs
    from common.data.datasets import get_dataset
    from common.encoder.artifact import load_encoder_artifact
    from common.encoder.features import check_encoder_shape

    check_out(args.out)
    specs = [spec for text in args.tasks for spec in split_task_list(text)]
    config = ContinualConfig(
        tasks=tuple(specs), scenarios=("task", "class") if args.scenario == "both" else (args.scenario,),
        replay_codes=tuple(args.replay_codes),
        replay_strategies=("reservoir", "balanced") if args.replay_strategy == "both" else (args.replay_strategy,),
        epochs=args.class_epochs if args.epochs is None else args.epochs,
        task_epochs=args.task_epochs if args.epochs is None else args.epochs,
        replay_flip=args.replay_flip, batch_size=args.batch_size, lr=args.lr, later_lr=args.later_lr,
        distill=args.distill, input_dropout=args.input_dropout, task_hidden=args.hidden, class_hidden=args.class_hidden, seed=args.seed,
        dataset=_dataset(args))
    artifact = load_encoder_artifact(args.encoder)
    check_encoder_shape(artifact, get_dataset(config.dataset))  # before any training
    results = run_continual(artifact, args.data_root, config)
    command = "hybnn " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if args.argv is None else args.argv))
    kept = write_outputs(results, args.out, command)
    if kept is not None:
        print(f"The earlier results in {args.out} are kept in {kept}")
    print(f"Results written to {args.out} (results.json, report.md, acc_matrix.png, "
          f"final_acc_vs_replay_bytes.png) in {results['total_seconds']:.0f} s")


def _federation_settings(args: argparse.Namespace) -> dict:
    """The options `federate` and `deploy-local` share, as FederateConfig fields."""
    from common.federated.settings import command_settings

    values = {s.field: getattr(args, s.field) for s in command_settings() if s.flag}
    return {**values, "dataset": _dataset(args)}


def cmd_federate(args: argparse.Namespace) -> None:
    from simulation.federate import FederateConfig, describe, federate

    check_out(args.out)
    config = FederateConfig(**_federation_settings(args), ray_address=args.ray_address)
    results = federate(config)
    print(describe(results))
    print(f"Results written to {args.out / 'results.json'} and {args.out / 'federated.png'}")


def cmd_deploy_local(args: argparse.Namespace) -> int | None:
    from simulation import netns
    from simulation.deploy_local import DeployConfig, deploy_local
    from simulation.federate import describe

    if args.network == "private":
        # Not root: the whole command runs again as root of a user namespace, with a network of its own.
        code = netns.reexec(["-m", "simulation.cli", *(sys.argv[1:] if args.argv is None else args.argv)])
        if code is not None:
            return code
    check_out(args.out)
    config = DeployConfig(**_federation_settings(args), min_nodes=args.min_nodes, certs=args.certs,
                          insecure=args.insecure, fleet_front=args.fleet_front, network=args.network)
    results = deploy_local(config)
    print(describe(results))
    print(f"Results written to {args.out / 'results.json'}")


FEDERATION_OPTION_TYPES = {"task": task_spec, "dataset": dataset_arg}
"""Option types beyond what a setting's type and range give."""


def _option_type(s) -> object:
    """The argparse type of a setting: ranges beyond positive are checked later, with the run's message."""
    if s.key in FEDERATION_OPTION_TYPES:
        return FEDERATION_OPTION_TYPES[s.key]
    if s.type is Path:
        return path_arg
    if s.type is int:
        return positive_int if s.minimum is not None and s.minimum >= 1 else int
    if s.type is float:
        return positive_float if s.above == 0 else float
    return str


def _add_federation_options(p: argparse.ArgumentParser, defaults: dict | None = None) -> None:
    """One option per setting with a CLI flag (common/federated/settings.py), its default, type and help from there."""
    from common.federated.settings import cli_default, command_settings

    for s in command_settings():
        if not s.flag:
            continue
        default = cli_default(s, defaults)
        help_text = s.help
        if s.default is not None:
            help_text += " (default: %(default)s" + (f", or ${s.env}" if s.env else "") + ")"
        kwargs = {"choices": list(s.choices)} if s.choices else {"type": _option_type(s)}
        if s.key == "dataset" or s.type is Path and s.default is None:
            kwargs["metavar"] = "NAME" if s.key == "dataset" else "DIR"
        if s.alone is not None:
            kwargs.update(nargs="?", const=s.alone)
            help_text += f"; {s.flag} alone: {s.alone}"
        p.add_argument(s.flag, default=default, help=help_text, **kwargs)
        if s.key == "dataset":
            p.add_argument("--image-size", default=None, metavar="HxW",
                           help="resize the data set's images to this size (N or HxW, 1 to 1024 a side); images are never "
                                "resized otherwise (default: none)")


def cmd_certs(args: argparse.Namespace) -> None:
    from simulation.credentials import make_credentials

    check_out(args.out)
    creds = make_credentials(args.out, hosts=args.host, supernodes=args.supernodes, force=args.force)
    print(f"Credentials written to {creds.root}: CA {creds.ca_cert.name}, SuperLink certificate "
          f"{creds.server_cert.name}, {creds.superexec_secret.name}, {args.supernodes} SuperNode key pair(s) "
          f"and SuperExec secret(s) in {creds.supernode_key(0).parent.name}/. Keep the private keys (mode 0600) where they are used; "
          f"docs/security.md says which file goes to which machine.")


def cmd_export(args: argparse.Namespace) -> None:
    from common.edge.deploy import NPZ_NAME, export_model
    from common.edge.export_c import HEADER_NAME, SOURCE_NAME
    from common.fileio import keeping_earlier

    out = check_out(args.out)
    names = (HEADER_NAME, SOURCE_NAME) if args.format == "c" else (NPZ_NAME,)
    out.mkdir(parents=True, exist_ok=True)
    with keeping_earlier(out, names) as kept:
        paths = export_model(args.model, out, args.format)
    for path in paths:
        print(f"wrote {path}")
    if kept is not None:
        print(f"The earlier export in {out} is kept in {kept}")


# ------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hybnn",
        description="HyBNN: a frozen binary-latent VAE encoder feeding a tiny binary neural "
                    "network; FedHyBNN trains that BNN across clients with Flower.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("data", help="fetch MNIST (or --dataset) into the data root and check it")
    _add_data_root(p)
    _add_dataset(p)
    p.set_defaults(handler=cmd_data)

    p = sub.add_parser("pretrain", help="train the binary-latent VAE and write the frozen encoder")
    _add_data_root(p)
    _add_dataset(p, union=True)
    p.add_argument("--out", type=path_arg, default=DEFAULT_ENCODER, help="artifact directory (default: %(default)s)")
    p.add_argument("--epochs", type=positive_int, default=20,
                   help="VAE epochs on the data set's training images (default: %(default)s; at most 10000; "
                        "the paper profile's MNIST encoder is --epochs 20 --input-shift 2)")
    p.add_argument("--kl-weight", type=non_negative_float, default=None,
                   help="weight of the KL term to the Bernoulli(0.5) prior; lower keeps more of "
                        "the image in the 200 bits (default: 1.0; docs/encoder.md)")
    # The CLI does not import torch; tests/test_cli.py keeps these in step with common.encoder.vae.
    p.add_argument("--variant", choices=("bernoulli-ste", "deterministic-ste"), default=None,
                   help="bernoulli-ste samples each bit in training (a binary VAE); deterministic-ste is "
                        "an autoencoder through the sign, no sampling, no KL (default: bernoulli-ste; "
                        "docs/encoder.md)")
    p.add_argument("--code-rotation", choices=("none", "itq"), default=None,
                   help="itq: after training, rotate the standardised logits by iterative quantization "
                        "(fitted on the training images, no labels) before their sign, folded into the "
                        "encoder (default: none; docs/encoder.md)")
    p.add_argument("--input-shift", type=int, choices=range(0, 9), default=0, metavar="PIXELS",
                   help="denoising by translation: the encoder sees each training image shifted by up to "
                        "this many pixels (0 to 8), the decoder reconstructs the unshifted image "
                        "(default: %(default)s, off; docs/encoder.md)")
    # checked by VAETrainConfig: argparse's choices would list all 46 values in the error
    p.add_argument("--input-rotation", type=int, default=0, metavar="DEGREES",
                   help="denoising by rotation: the encoder sees each training image turned by up to this "
                        "many degrees either way (0 to 45), the decoder reconstructs the upright image "
                        "(default: %(default)s, off; docs/encoder.md)")
    p.add_argument("--input-mask", type=float, default=0.0, metavar="FRACTION",
                   help="masking noise: the encoder sees each training image with this fraction of its "
                        "pixels zeroed at random (0 to 0.9), the decoder reconstructs the whole image "
                        "(default: %(default)s, off; docs/encoder.md)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=cmd_pretrain)

    p = sub.add_parser("upgrade-encoder", help="rewrite an earlier hybnn's encoder so its sha256 covers its manifest "
                       "(same codes)",
                       description="Rewrite the weights file of an encoder artifact written before the weights "
                                   "file recorded the manifest's fields (architecture, image shape, training data "
                                   "and config), so that the encoder's sha256 covers them. The tensors, and so "
                                   "the codes, stay the same; the sha256 changes (both are printed). The earlier "
                                   "files in the output folder are kept in OUT/replaced-TIME/ (docs/encoder.md).")
    p.add_argument("encoder", type=path_arg, metavar="DIR", help="the encoder artifact directory")
    p.add_argument("--out", type=path_arg, default=None, metavar="NEW",
                   help="write the upgraded artifact there and leave DIR as it is (default: DIR itself)")
    p.set_defaults(handler=cmd_upgrade_encoder)

    p = sub.add_parser("extract", help="encode a data set (MNIST by default) into packed 200-bit codes and cache them")
    _add_data_root(p)
    _add_dataset(p)
    _add_encoder(p)
    p.set_defaults(handler=cmd_extract)

    p = sub.add_parser("train", help="train the HyBNN BNN on one task from the encoder's codes")
    p.add_argument("--task", type=task_spec, required=True,
                   help=f"one of {', '.join(TASKS)}, or a spec of class groups: 3v8, 0,2,4,6,8v1,3,5,7,9, "
                        f"3,5,8, class names (docs/datasets.md)")
    _add_data_root(p)
    _add_dataset(p)
    _add_encoder(p)
    p.add_argument("--epochs", type=positive_int, default=PROFILES["paper"].bnn_epochs,
                   help="default: %(default)s; at most 10000")
    p.add_argument("--hidden", type=hidden_sizes, default=None,
                   help="binary hidden layer widths, comma-separated (default: 128, the "
                        "paper's, for the pair tasks; 512 for all10)")
    p.add_argument("--lr", type=positive_float, default=None,
                   help="Adam learning rate (default: 0.06)")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="default: 2048; at least 2 (batch norm)")
    p.add_argument("--input-dropout", type=probability_below_one, default=None,
                   help="zero each input bit with this probability while training, from 0 up to "
                        "(not including) 1, 0 = off; keeps the BNN from memorising its training "
                        "codes (default: 0.2, docs/datasets.md)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=path_arg, default=None,
                   help="where to save the trained BNN (default: runs/bnn-TASK)")
    p.set_defaults(handler=cmd_train)

    p = sub.add_parser("baseline", help="train one of the baseline CNNs on one task")
    p.add_argument("--model", required=True, choices=["bcnn-sign", "bcnn-centered", "fp-cnn"])
    p.add_argument("--task", type=task_spec, required=True,
                   help=f"one of {', '.join(TASKS)}, or a spec such as 3v8 (docs/datasets.md)")
    _add_data_root(p)
    _add_dataset(p)
    p.add_argument("--epochs", type=positive_int, default=PROFILES["paper"].baseline_epochs,
                   help="default: %(default)s; at most 10000")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=cmd_baseline)

    p = sub.add_parser("reproduce", help="the paper's experiment end to end: results.json, report.md, plots")
    p.add_argument("--profile", choices=list(PROFILES), default="paper",
                   help="quick: a first look in minutes; paper: the paper's epochs; transfer: encoders "
                        "trained on mnist, fashion-mnist and both, each tested on the tasks of both data "
                        "sets (docs/datasets.md); smoke, transfer-smoke: for the tests (default: %(default)s)")
    p.add_argument("--out", type=path_arg, required=True, help="output directory")
    _add_data_root(p)
    p.add_argument("--encoder-dir", type=path_arg, default=None,
                   help="encoder artifact to reuse or create (default: artifacts/encoder-PROFILE); for "
                        "the transfer profiles the folder holding one artifact per encoder, "
                        "DIR/encoder-PROFILE-NAME (default: artifacts)")
    p.add_argument("--tasks", type=task_name, nargs="+", default=list(TASKS),
                   help="tasks to run (default: all six; transfer runs each on every data set)")
    p.add_argument("--no-federated", action="store_true",
                   help="skip the three-client FedHyBNN runs (the transfer profiles have none)")
    p.set_defaults(handler=cmd_reproduce)

    # common/bnn/continual.py imports torch, so its ContinualConfig defaults are repeated here;
    # tests/test_continual.py keeps them in step.
    p = sub.add_parser("continual", help="learn tasks one after another on the frozen encoder: task- and "
                                         "class-incremental, with replay of stored codes (docs/continual.md)")
    p.add_argument("--tasks", nargs="+", default=["0v1,2v3,4v5,6v7,8v9"], metavar="TASKS",
                   help="the task sequence, comma-separated (use ; between specs that hold commas, or "
                        "give the tasks as separate words) (default: %(default)s)")
    p.add_argument("--scenario", choices=["task", "class", "both"], default="both",
                   help="task-incremental (task known at test time), class-incremental (one output per "
                        "class, task unknown) or both (default: %(default)s)")
    p.add_argument("--replay-codes", type=int, nargs="+", default=[0, 500, 2000, 5000], metavar="N",
                   help="class scenario: replay buffer sizes in codes, 0 = fine-tuning without replay "
                        "(default: %(default)s)")
    p.add_argument("--replay-strategy", choices=["reservoir", "balanced", "both"], default="both",
                   help="how the buffer is filled: reservoir sampling or an even split over the classes "
                        "seen (default: %(default)s)")
    p.add_argument("--task-epochs", type=positive_int, default=100,
                   help="task scenario: epochs per task (default: %(default)s, the BNN recipe's)")
    p.add_argument("--class-epochs", type=positive_int, default=15,
                   help="class scenario: epochs per task, and joint training's epochs (default: %(default)s)")
    p.add_argument("--epochs", type=positive_int, default=None,
                   help="epochs per task in both scenarios (overrides the two above; at most 10000)")
    p.add_argument("--lr", type=positive_float, default=0.06,
                   help="Adam learning rate of the first task (default: %(default)s)")
    p.add_argument("--later-lr", type=positive_float, default=None,
                   help="Adam learning rate of the later tasks (default: %(default)s)")
    p.add_argument("--distill", type=float, default=1.0,
                   help="class scenario, replay runs: weight of distillation towards the model before "
                        "the task, 0 = off (default: %(default)s)")
    p.add_argument("--replay-flip", type=float, default=0.05,
                   help="class scenario, replay runs: probability that each bit of a replayed code is "
                        "flipped, drawn afresh for every task, 0 = off (default: %(default)s)")
    p.add_argument("--input-dropout", type=probability_below_one, default=0.2,
                   help="class scenario, every run: probability that each input bit of a training batch "
                        "is zeroed, 0 = off (default: %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=2048,
                   help="default: %(default)s")
    p.add_argument("--hidden", type=hidden_sizes, default=None,
                   help="task scenario: hidden widths (default: 128, the paper's, for two-class tasks)")
    p.add_argument("--class-hidden", type=hidden_sizes, default=None,
                   help="class scenario: hidden widths (default: 512, as for all10)")
    _add_data_root(p)
    _add_dataset(p)
    _add_encoder(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=path_arg, required=True,
                   help="output directory; earlier results there are moved to DIR/replaced-TIME/")
    p.set_defaults(handler=cmd_continual)

    p = sub.add_parser("federate", help="FedHyBNN on Flower's simulation engine (Ray): N clients, one machine "
                                        "or a Ray cluster")
    _add_federation_options(p)
    p.add_argument("--ray-address", default=None, metavar="HOST:PORT",
                   help="join the running Ray cluster whose head node's GCS is at HOST:PORT (`ray start --head "
                        "--port PORT`), from a node of that cluster, instead of starting Ray on this machine; "
                        "every node needs the project, the encoder and the data root at the same paths "
                        "(docs/scale.md) (default: none)")
    p.set_defaults(handler=cmd_federate)

    p = sub.add_parser("deploy-local", help="FedHyBNN as real processes: a SuperLink and one SuperNode per client")
    # The SuperNodes are local processes: a shorter round timeout than the run config's default.
    _add_federation_options(p, {"out": "runs/deploy-local", "round-timeout-s": 300.0})
    p.add_argument("--min-nodes", type=positive_int, default=default_setting("min-train-nodes"),
                   help="go on with this many SuperNodes when others are gone (default: %(default)s)")
    p.add_argument("--certs", type=path_arg, default=None, metavar="DIR",
                   help="credentials from `hybnn certs` (default: fresh ones for this run only)")
    p.add_argument("--fleet-front", action="store_true",
                   help="SuperNodes connect through the Fleet-only TLS front (needs nginx), as on a real "
                        "deployment (docs/security.md)")
    p.add_argument("--insecure", action="store_true",
                   help="no TLS and no SuperNode authentication (prints what that exposes); only for comparison")
    p.add_argument("--network", choices=NETWORKS, default=DEFAULT_NETWORK,
                   help="private: the SuperLink, SuperNodes and flwr commands run in a network namespace of "
                        "their own, which no other process on this machine reaches (Linux; root, or a user "
                        "allowed user namespaces); host: on this machine's loopback, where every local "
                        "process can reach the SuperLink's unauthenticated Control API (default: %(default)s)")
    p.set_defaults(handler=cmd_deploy_local)

    p = sub.add_parser("certs", help="write a private CA, the SuperLink's TLS certificate, the SuperExec "
                                     "secret and, per SuperNode, a key pair and a SuperExec secret (docs/security.md)")
    p.add_argument("--out", type=path_arg, required=True, help="credentials directory")
    p.add_argument("--host", action="append", default=[], metavar="NAME",
                   help="a DNS name or IP address the SuperLink/front is reached at, beyond localhost, "
                        "127.0.0.1, ::1, superlink and fleet-front (repeatable)")
    p.add_argument("--supernodes", type=int, default=3,
                   help="SuperNodes to write a key pair and a secret for, 0 to 10000 (default: %(default)s)")
    p.add_argument("--force", action="store_true",
                   help="replace existing files (the old ones are moved to DIR/replaced-TIME/)")
    p.set_defaults(handler=cmd_certs)

    p = sub.add_parser("export", help="export a trained BNN for devices: C99 source or an npz for the numpy engine")
    p.add_argument("--model", type=path_arg, required=True,
                   help="a BNN directory written by `hybnn train` (or runs/.../models/TASK from reproduce)")
    p.add_argument("--format", choices=["c", "npz"], default="c", help="default: %(default)s")
    p.add_argument("--out", type=path_arg, required=True, help="output directory")
    p.set_defaults(handler=cmd_export)

    for name, command in sub.choices.items():
        if not any("--threads" in action.option_strings for action in command._actions):
            _add_threads(command)
    return parser


def _add_threads(p: argparse.ArgumentParser) -> None:
    from common.federated.settings import setting

    threads = setting("threads")
    p.add_argument("--threads", type=positive_int, default=threads.default,
                   help="torch threads of this process (default: %(default)s; docs/scale.md)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    try:
        if args.command != "certs":
            from common.resources import reuse_freed_memory, use_threads

            use_threads(args.threads)
            reuse_freed_memory()
        code = args.handler(args)
    except HyBNNError as exc:
        print(f"hybnn {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # The run has stopped and written what it reached; a further Ctrl-C must not end in a traceback.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print(f"hybnn {args.command}: interrupted", file=sys.stderr, flush=True)
        if argv is None:
            # As the program: what the run reached is written; skip the interpreter's slow teardown
            # (torch, gRPC) so that an interrupted run ends within seconds.
            sys.stdout.flush()
            os._exit(130)
        return 130
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
