"""``hybnn reproduce``: the paper's experiment end to end.

Stages, in order:

1. **encoder**: reuse the artifact in ``encoder_dir`` when its manifest matches this
   profile's VAE config, VAE training config and training-data hash (a matching one of an
   earlier hybnn, whose weights file does not record its manifest, stops the run with the
   message naming ``hybnn upgrade-encoder``); otherwise pretrain the binary-latent VAE and
   write a new artifact there;
2. **features**: the frozen encoder's codes for MNIST train and test (cached under
   the data root, keyed by the encoder's sha256);
3. **hybnn**: the paper's BNN on each task, saved under ``DIR/models/<task>/``;
4. **baselines**: bcnn-sign, bcnn-centered and fp-cnn on each task. They need no
   encoder, so on a machine with a CPU to spare for them (one torch thread each, as
   everything here trains) they train in a second process from the start, beside the
   encoder and the BNNs (:func:`baselines_beside`): the same seeds and one thread give the
   same numbers, and the run takes about the encoder's time less;
5. **federated** (optional): FedHyBNN with the profile's clients and rounds on each
   pair task, written under ``DIR/federated/<task>/``;
6. **report**: ``DIR/results.json``, ``DIR/report.md`` and the PNG plots.

The transfer profiles (:class:`common.experiments.profiles.TransferProfile`) run
:func:`reproduce_transfer` instead: an encoder per data set or union of the profile,
each one's codes through the BNN on every task of every data set, the baselines once
per (data set, task), and :mod:`common.experiments.transfer`'s report and heatmaps.

Nothing already written is destroyed by a failed run:

* the run writes into a hidden sibling directory ``.DIR.partial-<pid>`` and moves
  it to ``DIR`` only at the very end. If the run fails or is interrupted, that
  directory is removed and ``DIR`` is left exactly as it was;
* when the run succeeds and ``DIR`` already holds an earlier run (its results.json),
  the earlier run is kept as ``DIR.previous-<timestamp>`` rather than overwritten;
* a non-empty ``DIR`` that is not an earlier run of this command is refused up
  front, before any training, because it is somebody else's data;
* an encoder artifact that does not match is replaced only once the new one has been
  written, and the old one is kept as ``ENCODER_DIR.previous-<timestamp>``. A
  non-empty ``ENCODER_DIR`` without a manifest is refused. The data cache is only
  ever added to.
"""

from __future__ import annotations

import os
import shutil
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Callable, Iterable

from common.errors import HyBNNError
from common.experiments.profiles import Profile, TransferProfile, get_profile

STAGES = ("encoder", "features", "hybnn", "baselines", "federated", "report")


# ------------------------------------------------------------------ directories
def _timestamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def _aside_name(path: Path) -> Path:
    """A free ``PATH.previous-<timestamp>[-n]`` next to ``path``."""
    base = path.with_name(f"{path.name}.previous-{_timestamp()}")
    candidate, n = base, 1
    while candidate.exists():
        candidate = base.with_name(f"{base.name}-{n}")
        n += 1
    return candidate


def _is_nonempty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def check_out_dir(out_dir: Path) -> None:
    """Refuse an ``--out`` that is a file, or a non-empty directory not written by us."""
    from common.experiments.report import RESULTS_FILE

    if out_dir.exists() and not out_dir.is_dir():
        raise HyBNNError(
            f"--out {out_dir} is a file, not a directory. Pass a directory path for the "
            "results (it is created if missing)."
        )
    if _is_nonempty_dir(out_dir) and not (out_dir / RESULTS_FILE).is_file():
        raise HyBNNError(
            f"--out {out_dir} is a non-empty directory that does not hold an earlier "
            f"`hybnn reproduce` run (it has no {RESULTS_FILE}). To avoid mixing results into "
            "unrelated files, reproduce refuses it: pass a new or empty directory, or the "
            "directory of an earlier run (which is then kept as DIR.previous-<timestamp>)."
        )


def check_encoder_dir(encoder_dir: Path) -> None:
    """Refuse an encoder directory that is a file, or a non-empty directory with no manifest."""
    from common.encoder.artifact import MANIFEST_FILE

    if encoder_dir.exists() and not encoder_dir.is_dir():
        raise HyBNNError(
            f"--encoder-dir {encoder_dir} is a file, not an encoder artifact directory. Pass "
            "the directory of an artifact written by `hybnn pretrain`, or a new path where "
            "reproduce should write one."
        )
    if _is_nonempty_dir(encoder_dir) and not (encoder_dir / MANIFEST_FILE).is_file():
        raise HyBNNError(
            f"--encoder-dir {encoder_dir} is a non-empty directory without {MANIFEST_FILE}, so "
            "it is not an encoder artifact and reproduce will not write into it. Pass the "
            "directory of an artifact written by `hybnn pretrain`, or a new path."
        )


def _staging_dir(target: Path) -> Path:
    """Create and return a hidden sibling of ``target`` to write into."""
    staging = target.with_name(f".{target.name}.partial-{os.getpid()}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir()
    except OSError as exc:
        raise HyBNNError(
            f"Cannot create {staging} next to {target} ({exc.strerror or exc}). Pass a path "
            "in a directory you can write to."
        ) from exc
    return staging


def _move_into_place(staging: Path, target: Path) -> Path | None:
    """Move ``staging`` to ``target``; keep an earlier non-empty ``target`` aside. Returns its new name."""
    kept = None
    if _is_nonempty_dir(target):
        kept = _aside_name(target)
        os.replace(target, kept)
    elif target.is_dir():
        target.rmdir()
    os.replace(staging, target)
    return kept


# ------------------------------------------------------------------ stages
def encoder_training_images(dataset: str, data_root: Path, limit: int | None = None):
    """The VAE's training images of ``dataset`` (one data set or a union ``A+B``).

    ``limit`` keeps the first ``limit`` training images of each data set (of each part of
    a union, so a small union still holds all of its data sets). Returns ``(images,
    datasets, data_sha256)`` as :func:`common.data.datasets.pretrain_images` does.
    """
    import numpy as np

    from common.data.mnist import dataset_sha256
    from common.data.datasets import pretrain_images

    images, datasets, data_sha = pretrain_images(dataset, data_root)
    if limit is None:
        return images, datasets, data_sha
    parts = [d.load(data_root, "train") for d in datasets]
    images = np.concatenate([p[0][:limit] for p in parts])
    labels = np.concatenate([p[1][:limit] for p in parts])
    return images, datasets, dataset_sha256(images, labels)


def ensure_encoder(
    profile: Profile,
    encoder_dir: Path,
    data_root: Path,
    *,
    dataset: str = "mnist",
    epochs: int | None = None,
    progress: bool = True,
    say: Callable[[str], None] = print,
):
    """Reuse the matching artifact in ``encoder_dir`` or pretrain one; return ``(artifact, info)``.

    The encoder is trained on ``dataset`` (a data set or a union ``A+B``, as
    ``hybnn pretrain --dataset`` takes) for ``epochs`` (default: the profile's
    ``vae_epochs``) with the default :class:`VAEConfig` for the data's image shape; the
    profile's ``vae_images`` limits the images per data set. A manifest that matches
    the architecture, the training config and the training data's sha256 is reused.
    """
    from common.encoder.artifact import encoder_matches, load_encoder_artifact, save_encoder_artifact
    from common.encoder.vae import VAEConfig, VAETrainConfig, train_vae

    images, datasets, data_sha = encoder_training_images(dataset, data_root, profile.vae_images)
    epochs = profile.vae_epochs if epochs is None else epochs
    vae_config = VAEConfig(image_shape=datasets[0].shape)
    train_config = VAETrainConfig(epochs=epochs, input_shift=profile.vae_input_shift)
    started = time.perf_counter()
    if encoder_matches(encoder_dir, vae_config, data_sha, train_config.to_dict()):
        artifact = load_encoder_artifact(encoder_dir)
        reused, kept = True, None
        say(f"    reusing the encoder in {encoder_dir} (its manifest matches this profile)")
    else:
        say(f"    no matching encoder in {encoder_dir}: pretraining the VAE for "
            f"{epochs} epochs on {len(images)} images of {dataset}")
        vae, history = train_vae(images, vae_config, train_config, progress=progress)
        with _staged(encoder_dir) as staging:
            save_encoder_artifact(vae, staging, data_sha256=data_sha,
                                  train_config=train_config.to_dict(), history=history,
                                  datasets=[d.name for d in datasets],
                                  data_fingerprints={d.name: d.fingerprint(data_root) for d in datasets})
            kept = _move_into_place(staging, encoder_dir)
        if kept is not None:
            say(f"    the earlier, different encoder is kept as {kept}")
        artifact = load_encoder_artifact(encoder_dir)
        reused = False
    info = {
        "sha256": artifact.sha256,
        "path": str(encoder_dir),
        "reused": reused,
        "seconds": None if reused else time.perf_counter() - started,
        "variant": artifact.manifest.get("variant"),
        "latent_bits": artifact.manifest.get("latent_bits"),
        "epochs": artifact.manifest.get("train_config", {}).get("epochs"),
        "data_sha256": artifact.manifest.get("data_sha256"),
        "datasets": [d.name for d in datasets],
        "train_images": int(len(images)),
        "previous_kept_as": None if kept is None else str(kept),
    }
    return artifact, info


def run_hybnn(artifact, task_name: str, epochs: "int | Callable[[int, int], int]", data_root: Path,
              models_dir: Path, *, progress: bool = True, seed: int = 0, dataset: str = "mnist",
              record_root: Path | None = None) -> dict:
    """Train the task's BNN (:meth:`BNNConfig.for_task`) on ``dataset``'s codes and save it
    under ``models_dir/<task>``; the result names that folder relative to ``record_root``
    (default: the parent of ``models_dir``, the run's directory). ``epochs``: a number, or
    a function of (training codes, batch size) that gives it (:meth:`Profile.bnn_epochs_for`)."""
    from common.bnn.store import save_bnn
    from dataclasses import replace

    from common.encoder.features import load_codes
    from common.bnn.pipeline import HYBNN_TRAIN_CONFIG, train_hybnn
    from common.data.tasks import select_task, task_for_dataset

    task = task_for_dataset(task_name, dataset)
    _, labels = load_codes(artifact, data_root, "train", progress=False, dataset=dataset)  # cached: cheap
    train_samples = int(len(select_task(labels, labels, task)[1]))
    if callable(epochs):
        epochs = epochs(train_samples, HYBNN_TRAIN_CONFIG.batch_size)
    config = replace(HYBNN_TRAIN_CONFIG, epochs=epochs, seed=seed)
    run = train_hybnn(artifact, task, data_root, config, progress=progress, dataset=dataset)
    model_dir = models_dir / task.slug
    save_bnn(run.model, model_dir, meta={"task": task.name, "dataset": dataset,
                                         "class_names": list(task.class_names),
                                         "encoder_sha256": artifact.sha256,
                                         "test_acc": run.test_acc, "train": config.to_dict(),
                                         "train_seconds": run.train.seconds})
    return {
        "test_acc": run.test_acc,
        "test_loss": run.test_loss,
        "train_seconds": run.train.seconds,
        "train_cpu_seconds": run.train.cpu_seconds,
        "epochs": epochs,
        "history": run.train.history,
        "train_config": config.to_dict(),
        "train_samples": train_samples,
        "in_bits": run.model.config.in_bits,
        "hidden": list(run.model.config.hidden),
        "num_classes": run.model.config.num_classes,
        "model_dir": str(model_dir.relative_to(record_root or models_dir.parent)),
    }


def run_federated(artifact, task_name: str, profile: Profile, data_root: Path, out: Path,
                  *, progress: bool = True) -> dict:
    """FedHyBNN on ``task_name`` with the profile's clients and rounds; its summary."""
    from simulation.federate import FederateConfig, federate

    config = FederateConfig(
        task=task_name, clients=profile.fed_clients, rounds=profile.fed_rounds,
        local_epochs=profile.fed_local_epochs, encoder=Path(artifact.path), data_root=Path(data_root),
        out=out, partition="iid", progress=progress,
    )
    result = federate(config)
    rounds = result.get("rounds", [])
    return {
        "clients": profile.fed_clients,
        "rounds": profile.fed_rounds,
        "rounds_run": len(rounds),
        "local_epochs": profile.fed_local_epochs,
        "partition": "iid",
        "final_test_acc": result.get("final_test_acc"),
        "centralized_acc": result.get("centralized_acc"),
        "first_round_within_0_5_points": result.get("first_round_within_0_5_points"),
        "uplink_bytes_per_client_round": result.get("uplink_bytes_per_client_round"),
        "float_fedavg_uplink_bytes": result.get("float_fedavg_uplink_bytes"),
        "uplink_fraction_of_float": result.get("uplink_fraction_of_float"),
        "round_test_acc": [r.get("test_acc") for r in rounds],
        "seconds": result.get("seconds"),
        "dir": str(Path("federated") / task_name),
    }


# ------------------------------------------------------------------ the run
def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _machine(load_start: float | None) -> dict:
    """CPUs, torch threads and the load average: what the times in the report depend on."""
    import torch

    from common.bnn.product import cpu_model, product_choice

    return {"cpus": os.cpu_count(), "cpu_model": cpu_model(), "torch_threads": torch.get_num_threads(),
            "torch_version": torch.__version__, "load_start": load_start, "load_end": _load_average(),
            "bnn_product": product_choice().describe()}


def _publish(results: dict, report, staging: Path, out_dir: Path, *, started: float,
             load_start: float | None, report_started: float) -> Path | None:
    """Write ``report``'s outputs into ``staging``, then move it to ``out_dir``; the earlier run's new name."""
    results["machine"] = _machine(load_start)
    results["total_seconds"] = time.perf_counter() - started
    report.write_outputs(results, staging)
    results["stages"]["report"] = time.perf_counter() - report_started
    results["total_seconds"] = time.perf_counter() - started
    report.write_outputs(results, staging)  # again, with the report stage's own time
    return _move_into_place(staging, out_dir)


def _announce(results: dict, report, out_dir: Path, kept: Path | None, figures: str) -> None:
    print("", flush=True)
    print(report.summary_table(results), flush=True)
    print(f"\nWrote {out_dir / report.RESULTS_FILE}, {out_dir / report.REPORT_FILE} and {figures} "
          f"in {out_dir} ({results['total_seconds'] / 60:.1f} min)."
          + (f" The earlier run is kept as {kept}." if kept else ""), flush=True)


class _Progress:
    """Numbered stage lines (``[3/12] ...``) and indented notes; silent without ``progress``."""

    def __init__(self, total_steps: int, progress: bool) -> None:
        self.total_steps, self.progress, self.step = total_steps, progress, 0

    def say(self, text: str) -> None:
        if self.progress:
            print(text, flush=True)

    def stage(self, text: str) -> None:
        self.step += 1
        self.say(f"[{self.step}/{self.total_steps}] {text}")


@contextmanager
def _staged(out_dir: Path):
    """A staging folder beside ``out_dir``; removed on any exit (error, Ctrl-C, SIGTERM) unless published."""
    staging = _staging_dir(out_dir)
    try:
        yield staging
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _finish(results: dict, report, staging: Path, out_dir: Path, *, started: float,
            load_start: float | None, progress: _Progress, what: str, summary_key: str,
            summarize: Callable[[dict], dict]) -> Path | None:
    """The report stage: ``results[summary_key] = summarize(results)``, then the run is published."""
    t0 = time.perf_counter()
    progress.stage(f"report: results.json, report.md, {what}")
    results[summary_key] = summarize(results)
    return _publish(results, report, staging, out_dir, started=started, load_start=load_start,
                    report_started=t0)


def _unique_tasks(tasks: Iterable[str] | None) -> list[str]:
    from common.data.tasks import TASKS, get_task

    names = list(TASKS) if tasks is None else list(dict.fromkeys(tasks))
    if not names:
        raise HyBNNError(f"No tasks given. Pass --tasks with one or more of: {', '.join(TASKS)}.")
    for name in names:
        if name not in TASKS:  # the paper's experiment: its six named tasks only
            raise HyBNNError(f"Unknown task {name!r} for reproduce. Valid tasks are: {', '.join(TASKS)}; "
                             "`hybnn train --task SPEC` trains any other.")
        get_task(name)
    return names


def _train_baselines(task_names: list[str], epochs: int, data_root: Path, limit: int | None,
                     threads: int) -> dict[tuple[str, str], dict]:
    """Every baseline on every task, in this (second) process: ``{(task, model): entry}``."""
    import torch

    from common.experiments.baselines import BASELINES, train_baseline

    torch.set_num_threads(threads)
    return {(task, model): train_baseline(model, task, epochs=epochs, data_root=data_root, seed=0,
                                          progress=False, limit=limit)
            for task in task_names for model in BASELINES}


def _die_with_parent() -> None:
    """Linux: the kernel kills this process when its parent dies, even by SIGKILL."""
    import ctypes
    import signal
    import sys

    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    # Started with the run's stops blocked (baselines_beside): ignoring them drops any that came
    # while this process started (a Ctrl-C at the terminal reaches the whole process group);
    # the run, which got them too, stops and kills this process.
    stops = (signal.SIGINT, signal.SIGTERM)
    for signum in stops:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, stops)


@contextmanager
def baselines_beside(task_names: list[str], prof: Profile, data_root: Path):
    """The baselines training in a second process: yields the future of
    :func:`_train_baselines`'s result, or None where the machine has no CPU to spare beyond
    this process's torch threads (then the caller trains them itself). On the way out, by
    an error or Ctrl-C too, the second process is stopped."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import torch

    threads = torch.get_num_threads()
    if (os.cpu_count() or 1) < 2 * threads:
        yield None
        return
    import signal

    executor = None
    try:
        # The worker starts with SIGINT and SIGTERM blocked (a thread's signal mask survives fork
        # and exec) and ignores them from its first step on (_die_with_parent), so a Ctrl-C at
        # the terminal stops this process alone, which kills the worker below, and the worker
        # prints no traceback. A stop that comes during the start is held, not lost: Python runs
        # its handlers in this thread whatever the thread's mask (another thread takes the
        # signal), and one that ran now would break off the worker's start half way. So the
        # start's handlers only note the stop, and it is raised again once the start is done.
        stops = (signal.SIGINT, signal.SIGTERM)
        held: list[int] = []
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, stops)
        previous = {signum: signal.signal(signum, lambda signum, frame: held.append(signum)) for signum in stops}
        try:
            executor = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                           initializer=_die_with_parent)
            future = executor.submit(_train_baselines, list(task_names), prof.baseline_epochs, data_root,
                                     prof.train_limit, threads)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # as the caller had it
            for signum in dict.fromkeys(held):
                signal.raise_signal(signum)  # the run's own handler, now
        yield future
    finally:
        if executor is not None:
            for process in list((executor._processes or {}).values()):  # no public handle on the worker
                if process.is_alive():
                    process.kill()
            executor.shutdown(wait=True, cancel_futures=True)


def reproduce(
    profile: str | Profile = "paper",
    out_dir: Path | str = Path("runs/paper"),
    data_root: Path | str = Path("data"),
    encoder_dir: Path | str | None = None,
    tasks: Iterable[str] | None = None,
    federated: bool = True,
    *,
    progress: bool = True,
) -> dict:
    """Run the whole experiment of ``profile``; write ``out_dir``; return results.json's content.

    ``encoder_dir`` defaults to ``artifacts/encoder-<profile>``. ``tasks`` defaults
    to all six. See the module docstring for what happens to existing directories.
    """
    from common.experiments import report
    from common.experiments.baselines import BASELINES, train_baseline
    from common.data.tasks import PAIR_TASKS

    prof = profile if isinstance(profile, (Profile, TransferProfile)) else get_profile(profile)
    if isinstance(prof, TransferProfile):
        return reproduce_transfer(prof, out_dir, data_root, encoder_dir, tasks, progress=progress)
    task_names = _unique_tasks(tasks)
    out_dir = Path(out_dir)
    data_root = Path(data_root)
    encoder_dir = Path(encoder_dir) if encoder_dir is not None else Path("artifacts") / f"encoder-{prof.name}"
    check_out_dir(out_dir)
    check_encoder_dir(encoder_dir)

    fed_tasks = [t for t in task_names if t in PAIR_TASKS] if federated else []
    steps = _Progress(1 + 1 + len(task_names) * (1 + len(BASELINES)) + len(fed_tasks) + 1, progress)
    say, stage = steps.say, steps.stage

    started = time.perf_counter()
    load_start = _load_average()
    with _staged(out_dir) as staging, ExitStack() as stack:
        stages: dict[str, float] = {}

        baselines = stack.enter_context(baselines_beside(task_names, prof, data_root))
        if baselines is not None:
            say(f"Baselines ({', '.join(BASELINES)}) train in a second process meanwhile")
        t0 = time.perf_counter()
        stage(f"encoder ({prof.vae_epochs} VAE epochs)")
        artifact, encoder_info = ensure_encoder(prof, encoder_dir, data_root, progress=progress, say=say)
        stages["encoder"] = time.perf_counter() - t0
        results = report.new_results(prof.to_dict(), encoder_info)
        results["stages"] = stages

        t0 = time.perf_counter()
        stage("features: encoding MNIST train and test into 200-bit codes (cached)")
        from common.encoder.features import load_codes

        for split in ("train", "test"):
            load_codes(artifact, data_root, split, progress=progress)
        stages["features"] = time.perf_counter() - t0

        from common.bnn.product import product_choice

        say(product_choice().describe())
        t0 = time.perf_counter()
        for task in task_names:
            step_cap = f", at most {prof.bnn_steps} steps' worth" if prof.bnn_steps else ""
            stage(f"hybnn on {task} ({prof.bnn_epochs} epochs{step_cap})")
            entry = run_hybnn(artifact, task, prof.bnn_epochs_for, data_root, staging / "models", progress=progress)
            results["tasks"].setdefault(task, {})["hybnn"] = entry
            say(f"    test accuracy {entry['test_acc']:.4f} in {entry['train_seconds']:.1f} s ({entry['epochs']} epochs)")
        stages["hybnn"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        if baselines is not None:
            say("Waiting for the baselines' process")
            entries = baselines.result()
        for task in task_names:
            for model in BASELINES:
                if baselines is None:
                    stage(f"{model} on {task} ({prof.baseline_epochs} epochs)")
                    entry = train_baseline(model, task, epochs=prof.baseline_epochs, data_root=data_root,
                                           seed=0, progress=progress, limit=prof.train_limit)
                else:
                    entry = entries[task, model]
                    stage(f"{model} on {task} ({prof.baseline_epochs} epochs, in the second process)")
                results["tasks"][task][model] = {k: v for k, v in entry.items() if k not in ("model", "task")}
                say(f"    test accuracy {entry['test_acc']:.4f} in {entry['train_seconds']:.1f} s "
                    f"({entry['samples_per_second']:.0f} samples/s)")
        # with a second process: how long the baselines held up the run after the BNNs
        stages["baselines" if baselines is None else "baselines (beyond the encoder and BNNs)"] = \
            time.perf_counter() - t0

        if fed_tasks:
            t0 = time.perf_counter()
            for task in fed_tasks:
                stage(f"fedhybnn on {task} ({prof.fed_clients} clients, {prof.fed_rounds} rounds)")
                try:
                    entry = run_federated(artifact, task, prof, data_root, staging / "federated" / task,
                                          progress=progress)
                except Exception as exc:  # a federation failure must not lose the other results
                    kind = "" if isinstance(exc, HyBNNError) else f"{type(exc).__name__}: "
                    entry = {"error": f"{kind}{exc}"}
                    say(f"    the federated run failed: {kind}{exc}")
                results["tasks"][task]["fedhybnn"] = entry
            stages["federated"] = time.perf_counter() - t0

        kept = _finish(results, report, staging, out_dir, started=started, load_start=load_start,
                       progress=steps, what="plots",
                       summary_key="cost_ratio", summarize=report.cost_ratios)
    _announce(results, report, out_dir, kept, "the plots")
    return results


# ------------------------------------------------------------------ transfer
def transfer_encoder_dirs(profile: TransferProfile, encoder_parent: Path | str | None) -> dict[str, Path]:
    """``{encoder name: its artifact directory}``: ``PARENT/encoder-<profile>-<name>``.

    ``PARENT`` is ``--encoder-dir`` (default ``artifacts``). The profile is in the name
    so that ``transfer-smoke`` never replaces the real ``transfer`` encoders.
    """
    from common.encoder.artifact import MANIFEST_FILE

    parent = Path("artifacts") if encoder_parent is None else Path(encoder_parent)
    if parent.exists() and not parent.is_dir():
        raise HyBNNError(
            f"--encoder-dir {parent} is a file. For the {profile.name} profile it names the folder "
            "that holds its encoders (one artifact per encoder, created if missing).")
    if (parent / MANIFEST_FILE).exists():
        raise HyBNNError(
            f"--encoder-dir {parent} is an encoder artifact, but the {profile.name} profile trains "
            f"{len(profile.encoders)} encoders ({', '.join(profile.encoders)}) and takes the folder that "
            "holds them: pass its parent folder, or a new one (default: artifacts).")
    dirs = {name: parent / f"encoder-{profile.name}-{name}" for name in profile.encoders}
    for path in dirs.values():
        check_encoder_dir(path)
    return dirs


def _transfer_tasks(tasks: Iterable[str] | None, profile: TransferProfile) -> list[str]:
    """The named tasks to run on every data set (default: all six)."""
    from common.data.tasks import TASKS, task_for_dataset

    names = list(TASKS) if tasks is None else list(dict.fromkeys(tasks))
    if not names:
        raise HyBNNError(f"No tasks given. Pass --tasks with one or more of: {', '.join(TASKS)}.")
    for name in names:
        if name not in TASKS:  # a task must exist in every data set: the named ones only
            raise HyBNNError(f"Unknown task {name!r} for the {profile.name} profile, which runs each task "
                             f"on every data set ({', '.join(profile.datasets)}). Valid tasks are: "
                             f"{', '.join(TASKS)}; `hybnn train --dataset D --task SPEC` trains any other.")
        for dataset in profile.datasets:
            task_for_dataset(name, dataset)
    return names


def reproduce_transfer(
    profile: TransferProfile,
    out_dir: Path | str,
    data_root: Path | str = Path("data"),
    encoder_parent: Path | str | None = None,
    tasks: Iterable[str] | None = None,
    *,
    progress: bool = True,
) -> dict:
    """The transfer experiment: every encoder of ``profile`` with the paper's BNN on every
    task of every data set, and the baselines once per (data set, task).

    Writes ``out_dir`` (results.json, report.md, heatmaps, the BNNs under
    ``models/<encoder>/<data set>/<task>``) with the same care for existing directories
    as :func:`reproduce`; returns results.json's content (:mod:`common.experiments.transfer`).
    """
    from common.experiments import transfer as report
    from common.experiments.baselines import train_baseline
    from common.encoder.features import load_codes

    task_names = _transfer_tasks(tasks, profile)
    out_dir, data_root = Path(out_dir), Path(data_root)
    encoder_dirs = transfer_encoder_dirs(profile, encoder_parent)
    check_out_dir(out_dir)

    n_enc, n_data = len(profile.encoders), len(profile.datasets)
    runs = len(task_names) * n_data
    steps = _Progress(2 * n_enc + n_enc * runs + runs * len(report.BASELINE_MODELS) + 1, progress)
    say, stage = steps.say, steps.stage

    started = time.perf_counter()
    load_start = _load_average()
    with _staged(out_dir) as staging:
        results = report.new_results(profile.to_dict())
        stages: dict[str, float] = {"encoders": 0.0, "features": 0.0}
        results["stages"] = stages
        artifacts = {}
        for name in profile.encoders:
            union = "+" in name
            epochs = profile.union_vae_epochs if union else profile.vae_epochs
            t0 = time.perf_counter()
            stage(f"encoder {name} ({epochs} VAE epochs)")
            artifact, info = ensure_encoder(profile, encoder_dirs[name], data_root, dataset=name,
                                            epochs=epochs, progress=progress, say=say)
            stages["encoders"] += time.perf_counter() - t0
            artifacts[name] = artifact
            results["encoders"][name] = info

            t0 = time.perf_counter()
            stage(f"features: encoder {name} on {', '.join(profile.datasets)} train and test (cached)")
            for dataset in profile.datasets:
                for split in ("train", "test"):
                    load_codes(artifact, data_root, split, progress=progress, dataset=dataset)
            stages["features"] += time.perf_counter() - t0

        t0 = time.perf_counter()
        for name, artifact in artifacts.items():
            per_dataset = results["results"].setdefault(name, {})
            for dataset in profile.datasets:
                for task in task_names:
                    stage(f"hybnn, encoder {name}, {dataset} {task} ({profile.bnn_epochs} epochs)")
                    entry = run_hybnn(artifact, task, profile.bnn_epochs, data_root,
                                      staging / "models" / name / dataset, progress=progress,
                                      dataset=dataset, record_root=staging)
                    per_dataset.setdefault(dataset, {}).setdefault(task, {})["hybnn"] = entry
                    say(f"    test accuracy {entry['test_acc']:.4f} in {entry['train_seconds']:.1f} s")
        stages["hybnn"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        for dataset in profile.datasets:
            for task in task_names:
                for model in report.BASELINE_MODELS:
                    stage(f"{model} on {dataset} {task} ({profile.baseline_epochs} epochs)")
                    entry = train_baseline(model, task, epochs=profile.baseline_epochs, data_root=data_root,
                                           seed=0, progress=progress, limit=profile.train_limit,
                                           dataset=dataset)
                    entry = {k: v for k, v in entry.items() if k not in ("model", "task")}
                    for name in profile.encoders:  # the same run beside every encoder's row
                        results["results"][name][dataset][task][model] = entry
                    say(f"    test accuracy {entry['test_acc']:.4f} in {entry['train_seconds']:.1f} s")
        stages["baselines"] = time.perf_counter() - t0

        kept = _finish(results, report, staging, out_dir, started=started, load_start=load_start,
                       progress=steps, what="heatmaps",
                       summary_key="transfer_costs", summarize=report.transfer_costs)
    _announce(results, report, out_dir, kept, "the heatmaps")
    return results
