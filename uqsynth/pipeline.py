"""``uqsynth run``: validate the configuration, then run the stages in order.

Stages: train -> sample -> calibrate -> certify -> evaluate -> report.
Everything that can be checked (configuration, plugins, data, split, the
networks at the configured slice size, an existing run in ``--out``) is
checked before the run directory is touched, so bad input leaves no output
behind.

Started again with the same command, a run continues where it stopped:
training from its last completed epoch, sampling and calibration per
subject and calibrator. A lock (:mod:`uqsynth.run_directory`) keeps a second
process out of a live run's directory.

Under ``torchrun`` every process runs this same code on its own
:class:`~uqsynth.distributed.World` rank: training is data-parallel,
sampling, calibration and evaluation are sharded by subject, and rank 0
alone prints and writes the shared files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import uqsynth
from uqsynth._files import RECORD, atomic_write_text, recording
from uqsynth.config import Config, PluginSpec, dumps_config, load_config
from uqsynth.data.base import CachedDataset, Dataset, RecordingDataset
from uqsynth.data.slices import EvalVolume, TrainSlices, axial_subsample
from uqsynth.data.split import Split, split_subjects
from uqsynth.devices import resolve_device
from uqsynth.distributed import SINGLE, World, close_world, init_world
from uqsynth.errors import ConfigError, UserError
from uqsynth.metrics import STD_FLOOR
from uqsynth.plugins import PluginHost, get_host
from uqsynth.parallel_arms import check_picklable, train_in_parallel, worker_count, worker_threads
from uqsynth.posterior import PosteriorSampler
from uqsynth.inference import load_arm, posterior_maps, sampler_options, write_maps
from uqsynth.run_directory import (
    ArmPaths,
    RunInputs,
    RunLock,
    bind_outputs,
    check_existing_run,
    clear_run,
    content_digest,
    inputs_difference,
    outputs_difference,
    remove_stale_temporaries,
)
from uqsynth.training import ArmModels, Trainer, build_arm, dropout_probabilities, seed_everything


def describe_plugin(spec: PluginSpec) -> str:
    params = ", ".join(f"{k}={v}" for k, v in spec.params.items())
    return f"{spec.name}({params})" if params else spec.name


def describe_run(
    config: Config, host: PluginHost, out: Path, device: torch.device, smoke: bool, world: World = SINGLE
) -> list[str]:
    """The first lines a run prints: which data, which scale and which plugins."""
    data = config.data
    options = describe_plugin(PluginSpec(data.source, data.options.get(data.source, {})))
    source = options + (f" at {data.root}" if data.root and _takes_root(host, data.source) else "")
    scale = (
        f"{data.image_size}x{data.image_size} slices (load {data.load_size}), "
        f"{config.train.epochs} epoch(s), batch {config.train.batch_size}, {sampler_options(config).describe()}"
    )
    if config.train.ema_decay:
        scale += f", generator weight average (decay {config.train.ema_decay:g})"
    model = config.model
    lines = [
        f"uqsynth {uqsynth.__version__}: run '{config.run.name}'{' (smoke)' if smoke else ''} -> {out} on {device}",
        *([f"distributed: {world.describe()}"] if world.distributed else []),
        f"data: {source}; scale: {scale}",
        f"model: generator {describe_plugin(model.generator)}, discriminator {describe_plugin(model.discriminator)}, "
        f"adversarial loss {describe_plugin(model.adversarial_loss)}",
    ]
    for name, arm in config.arms.items():
        lines.append(f"arm {name}: {describe_plugin(arm.stochastic_layer)} at positions {arm.positions}, "
                     f"likelihood {describe_plugin(arm.likelihood)}")
    return lines


@dataclass
class RunContext:
    """What the stages share: the resolved configuration, plugins, paths and data."""

    config: Config
    host: PluginHost
    out_dir: Path
    device: torch.device
    world: World = SINGLE
    dataset: Dataset | None = None
    split: Split | None = None
    train_set: TrainSlices | None = None
    models: dict[str, ArmModels] = field(default_factory=dict)
    timing: dict[str, float] = field(default_factory=dict)
    evaluations: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    digests: dict[str, str] = field(default_factory=dict)  # subject id -> content digest, from prepare
    input_warnings: dict[str, list[str]] = field(default_factory=dict)  # subject id -> suspect-input warnings

    def say(self, line: str) -> None:
        """A progress line on stderr, from rank 0 only."""
        if self.world.is_main:
            print(line, file=sys.stderr)


def _takes_root(host: PluginHost, dataset: str) -> bool:
    return "root" in inspect.signature(host["dataset"].get(dataset).factory).parameters


def build_dataset(config: Config, host: PluginHost) -> Dataset:
    """The configured dataset plugin; ``data.root`` goes to plugins that read files."""
    params = dict(config.data.options.get(config.data.source, {}))
    if _takes_root(host, config.data.source):
        if config.data.root is None:
            raise ConfigError(f"data.root: dataset {config.data.source} reads files, so data.root must be set")
        params["root"] = config.data.root
    return host["dataset"].create(config.data.source, **params)


def subject_split(config: Config, ids: Sequence[str]) -> Split:
    """The run's split of the subjects ``ids``: it depends on nothing but them and the configuration."""
    held_out = config.calibration.subjects == "held_out"
    return split_subjects(
        ids,
        test_fraction=config.data.test_fraction,
        seed=config.run.seed,
        test_ids=config.data.test_subjects or None,
        calibration_fraction=config.calibration.held_out_fraction if held_out else 0.0,
    )


def check_calibration_subjects(context: RunContext) -> None:
    """Refuse, before training, a calibration split too small for a configured calibrator's guarantee.

    Why now: a subject-level calibrator (``conformal_risk``, ``risk_control``)
    given fewer subjects than its ``alpha`` (and ``delta``) need certifies
    no finite interval; learning that after training costs the whole run.

    Raises:
        ConfigError: One line naming the calibrator, what it needs and what the split has.
    """
    calibration = context.config.calibration
    available = len(calibration_subjects(context))
    for spec in calibration.calibrators:
        needed = context.host["calibrator"].build(spec).required_subjects()
        if available < needed:
            where = ("the held-out calibration split" if calibration.subjects == "held_out"
                     else "the training subjects it is fitted on")
            params = ", ".join(f"{key} {value}" for key, value in sorted(spec.params.items())) or "its defaults"
            raise ConfigError(
                f"calibration.calibrators: {spec.name} ({params}) needs at least {needed} calibration subjects, "
                f"but {where} has {available}; give the split more subjects (calibration.held_out_fraction, "
                "calibration.max_subjects, or more data) or relax alpha/delta"
            )


def prepare(context: RunContext) -> None:
    """Everything that can fail on bad input, before the run directory is touched.

    Builds the dataset and the split, reads every subject once (the
    training slices are kept for training; a broken test volume is refused
    now, not after training), and each arm's networks (checked on a slice of
    ``data.image_size``; kept for training).
    """
    config = context.config
    if context.world.distributed and config.train.sync_batchnorm and context.device.type != "cuda":
        raise ConfigError("train.sync_batchnorm: torch's SyncBatchNorm runs on GPUs only; set it to false on CPUs")
    dataset = build_dataset(config, context.host)
    context.split = subject_split(config, dataset.subject_ids())
    # Read by every later stage and arm: kept in memory after their first read (data.cache_mb).
    context.dataset = CachedDataset(dataset, {*context.split.test, *calibration_subjects(context)},
                                    max_bytes=config.data.cache_mb * 2**20)
    check_calibration_subjects(context)
    for line in context.dataset.scan_summary():
        context.say(f"data: {line}")
    started = time.perf_counter()
    # TrainSlices loads the training subjects itself: the recorder keeps their warnings and digests (for split.json).
    recorder = RecordingDataset(context.dataset, digest=content_digest)
    context.train_set = TrainSlices(
        recorder,
        context.split.train,
        image_size=config.data.image_size,
        load_size=config.data.load_size,
        min_brain_fraction=config.data.min_brain_fraction,
    )
    for subject_id in sorted({*context.split.test, *context.split.calibration} - set(context.split.train)):
        recorder.load(subject_id)
    context.digests = recorder.digests
    context.input_warnings = {sid: recorder.warnings[sid] for sid in sorted(recorder.warnings)}
    for lines in context.input_warnings.values():
        for line in lines:
            context.say(f"warning: {line}")
    context.say(
        f"data: {len(context.split.train)} training subjects ({len(context.train_set)} slices), "
        f"{len(context.split.test)} test subjects; read and checked in {time.perf_counter() - started:.1f} s"
    )
    for arm_name, arm in config.arms.items():
        seed_everything(config.run.seed)  # every arm starts from the same weights
        context.models[arm_name] = build_arm(config, arm_name, context.host)
    if trains_in_parallel(context):
        check_picklable(context.models)


def trains_in_parallel(context: RunContext) -> bool:
    """Whether the arms train side by side in worker processes (``train.parallel_arms``, at most that many).

    Not under torchrun, whose processes already share each arm's training
    (data-parallel): the arms then train one after another.
    """
    return context.config.train.parallel_arms > 1 and len(context.config.arms) > 1 and not context.world.distributed


def stage_train(context: RunContext) -> None:
    """Train every arm on the training subjects (resuming finished epochs)."""
    config, world = context.config, context.world
    if world.is_main:  # before training: a killed run still says what it was trained on
        atomic_write_text(context.out_dir / "split.json", run_inputs(context).dumps())
    if world.distributed and config.train.parallel_arms > 1:
        context.say(f"train: train.parallel_arms = {config.train.parallel_arms} does not apply under torchrun: "
                    f"its {world.size} processes train each arm together, one arm after another")
    if trains_in_parallel(context):
        processes = worker_count(config)
        context.say(f"train: {len(config.arms)} arms, {processes} at a time, each in a process of its own "
                    f"on {worker_threads(processes)} thread(s) (train.parallel_arms)")
        train_in_parallel(config, context.models, context.train_set, context.out_dir, context.device)
        return
    for arm_name in config.arms:
        arm_dir = context.out_dir / arm_name
        trainer = Trainer(
            config, arm_name, context.models[arm_name], context.train_set, arm_dir, context.device, world=world
        )
        trainer.fit()


def stage_sample(context: RunContext) -> None:
    """Posterior mean and std (total, epistemic, aleatoric) of every test subject, per arm, under ``RUN/<arm>/predictions/``.

    Resumable per subject: volumes whose maps all exist are not sampled
    again. Under torchrun each rank samples and writes its share of the subjects.
    """
    config, world = context.config, context.world
    for arm_name in config.arms:
        # Before the first prediction: which generator made them.
        on_main(world, lambda arm_dir=context.out_dir / arm_name: bind_outputs(arm_dir, arm_dir.name))
        paths = ArmPaths(context.out_dir / arm_name)
        out_dir = paths.predictions
        out_dir.mkdir(parents=True, exist_ok=True)
        sampler = arm_sampler(context, arm_name)
        started, done = time.perf_counter(), 0
        for subject_id in world.shard(context.split.test):
            if all(paths.prediction(subject_id, name).exists() for name in PREDICTED_MAPS):
                continue
            volumes = context.dataset.load(subject_id)
            evaluation = EvalVolume(volumes, image_size=config.data.image_size, load_size=config.data.load_size)
            maps = posterior_maps(sampler, evaluation, progress=world.is_main)
            write_maps({name: maps[name] for name in PREDICTED_MAPS}, volumes, out_dir, subject_id)
            done += 1
        done = int(world.all_reduce_sum(np.array(done)))
        processes = f" on {world.size} processes" if world.distributed else ""
        context.say(f"arm {arm_name}: sampled {done} test subject(s) with {sampler.options.describe()}{processes} "
                    f"in {time.perf_counter() - started:.1f} s -> {out_dir}")


#: The maps the sample stage writes per test subject (the evaluation reads them back).
PREDICTED_MAPS = ("mean", "std", "std_epistemic", "std_aleatoric")


def arm_sampler(context: RunContext, arm_name: str) -> PosteriorSampler:
    """The sampling engine for the arm's generator and likelihood, with the run's ``[sampling]`` options."""
    models = context.models[arm_name]
    return PosteriorSampler(models.generator, sampler_options(context.config), context.device, models.likelihood)


def calibration_subjects(context: RunContext) -> list[str]:
    """The subjects calibrators are fitted on: training subjects (the paper) or the held-out split."""
    calibration = context.config.calibration
    subjects = context.split.train if calibration.subjects == "train" else context.split.calibration
    return subjects[: calibration.max_subjects] if calibration.max_subjects else list(subjects)


def run_inputs(context: RunContext) -> RunInputs:
    """What ``split.json`` records: each role's subjects and the digests of the subjects read."""
    roles = {"train": context.split.train, "test": context.split.test, "calibration": calibration_subjects(context)}
    return RunInputs(context.dataset.subject_ids(), roles, dict(context.digests), dict(context.input_warnings))


def stage_calibrate(context: RunContext) -> None:
    """Fit every configured calibrator per arm on the calibration subjects, sampled one at a time.

    Saved as ``RUN/<arm>/calibrators/<name>.safetensors`` (no pickled code),
    bound to the arm; calibrators already saved are not fitted again. The
    fitting itself, across processes under torchrun, is
    :func:`uqsynth.calibration.fitting.fit_calibrators`'s.
    """
    from uqsynth.calibration.fitting import SubjectVoxels, fit_calibrators
    from uqsynth.calibration.io import FORMAT, save_calibrator, saved_format
    config, world = context.config, context.world
    subjects = calibration_subjects(context)
    for arm_name in config.arms:
        paths = ArmPaths(context.out_dir / arm_name)
        out_dir = paths.calibrators
        # Rank 0's view of what is saved decides, so every rank takes part in the same collectives.
        # A file of an older format (fitted without a floor) is fitted again, like a missing one.
        pending = world.broadcast(
            [s for s in config.calibration.calibrators if saved_format(paths.calibrator(s.name)) != FORMAT]
        )
        if not pending:
            continue
        on_main(world, lambda arm_dir=context.out_dir / arm_name: bind_outputs(arm_dir, arm_dir.name))
        calibrators = {spec.name: context.host["calibrator"].build(spec) for spec in pending}
        sampler = arm_sampler(context, arm_name)
        started, degenerate = time.perf_counter(), 0

        def subject_voxels():
            nonlocal degenerate
            for subject_id in world.shard(subjects):
                volumes = axial_subsample(context.dataset.load(subject_id), config.calibration.slice_stride)
                evaluation = EvalVolume(volumes, image_size=config.data.image_size, load_size=config.data.load_size)
                maps = posterior_maps(sampler, evaluation, progress=world.is_main)
                # Every brain voxel, a round-off std too: the calibrators give it a width of their own.
                brain = evaluation.native_mask()
                if not brain.any():
                    continue
                degenerate += int((maps["std"][brain] < STD_FLOOR).sum())
                truth, regions = evaluation.normalized_target(), evaluation.native_regions()
                yield SubjectVoxels(subject_id, maps["mean"][brain], maps["std"][brain], truth[brain],
                                    None if regions is None else regions[brain])

        voxels = fit_calibrators(calibrators, subject_voxels(), world)
        voxels, degenerate = (int(v) for v in world.all_reduce_sum(np.array([voxels, degenerate])))
        if world.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            for name, calibrator in calibrators.items():
                save_calibrator(calibrator, paths.calibrator(name), name=name, arm=arm_name)
        world.barrier()
        note = (f"; {degenerate} of them with a predicted std below {STD_FLOOR:g} (MC samples equal to "
                f"round-off), fitted with the rest" if degenerate else "")
        stride = config.calibration.slice_stride
        slices = f" (one axial slice in {stride})" if stride > 1 else ""
        context.say(f"arm {arm_name}: fitted {', '.join(calibrators)} on {voxels} voxels of {len(subjects)} "
                    f"{config.calibration.subjects} subject(s){slices} in {time.perf_counter() - started:.1f} s{note}")
        for name, calibrator in calibrators.items():
            report = calibrator.fit_report() if world.is_main else {}
            if report:
                context.say(f"arm {arm_name}: {name} " + ", ".join(f"{k} {v:.4g}" for k, v in report.items()))


#: The level of a run's certificates for calibrators without an ``alpha`` of their own.
CERTIFICATE_LEVEL = 0.9


def stage_certify(context: RunContext) -> None:
    """``RUN/<arm>/predictions/<id>_uncertainty.json`` beside every test subject's maps (:mod:`uqsynth.certificate`).

    One entry per fitted calibrator, at its own level (``1 - alpha`` for a
    calibrator with an ``alpha``, else :data:`CERTIFICATE_LEVEL`): its promise
    and the subject's mean interval width, from the saved maps (no sampling);
    the uncalibrated Gaussian interval's (no promise) when none is configured.
    Written again on every run, so the certificates always describe the
    calibrators now beside them. Under torchrun each rank writes its share.
    """
    from uqsynth.calibration.io import load_calibrator
    from uqsynth.certificate import certificate, certificate_path, interval_entry, write_certificate
    from uqsynth.evaluation import read_prediction
    from uqsynth.metrics import gaussian_interval

    config, world = context.config, context.world
    configured = [spec.name for spec in config.calibration.calibrators]
    fitted = {}
    for arm_name in config.arms:
        paths = ArmPaths(context.out_dir / arm_name)
        fitted[arm_name] = [(paths.calibrator(name), *load_calibrator(paths.calibrator(name), arm=arm_name))
                            for name in paths.fitted(configured)]
    started, written = time.perf_counter(), 0
    for subject_id in world.shard(context.split.test):
        volumes = context.dataset.load(subject_id)
        brain = EvalVolume(volumes, image_size=config.data.image_size).native_mask()
        for arm_name, arm in config.arms.items():
            paths = ArmPaths(context.out_dir / arm_name)
            mean = read_prediction(paths.prediction(subject_id, "mean"))[brain]
            std = read_prediction(paths.prediction(subject_id, "std"))[brain]
            entries = []
            if not fitted[arm_name]:  # no calibrator configured: what the uncalibrated interval promises (nothing)
                entries.append(interval_entry(CERTIFICATE_LEVEL, *gaussian_interval(mean, std, CERTIFICATE_LEVEL)))
            for path, name, calibrator in fitted[arm_name]:
                level = round(1.0 - float(getattr(calibrator, "alpha", 1.0 - CERTIFICATE_LEVEL)), 12)
                lower, upper = calibrator.interval(mean, std, level)
                entries.append(interval_entry(level, lower, upper, name=name, calibrator=calibrator,
                                              calibrator_file=path))
            document = certificate(
                volume=subject_id, arm=arm_name, generator_file=paths.generator,
                likelihood=arm.likelihood.name, sampling=sampler_options(config).record(), seed=config.run.seed, std=std,
                intervals=entries, maps={name: f"{subject_id}_{name}.nii.gz" for name in PREDICTED_MAPS},
                region_names=volumes.region_names if volumes.regions is not None else None,
            )
            write_certificate(certificate_path(paths.predictions, subject_id), document)
            written += 1
    written = int(world.all_reduce_sum(np.array(written)))
    context.say(f"certificates: {written} written beside the test subjects' predictions "
                f"(<id>_uncertainty.json) in {time.perf_counter() - started:.1f} s")


def stage_evaluate(context: RunContext) -> None:
    """Every metric of every arm from the saved predictions: ``metrics.json`` and ``metrics.csv``.

    Under torchrun each rank evaluates its share of the test subjects and
    rank 0 merges the parts (per-subject numbers as they are, cohort sums
    added) and writes the files.
    """
    from uqsynth.evaluation import (
        calibration_record,
        evaluate_arm,
        evaluate_linear_baseline,
        merge_evaluations,
        metrics_document,
        metrics_rows,
        write_metrics,
    )

    world = context.world
    started = time.perf_counter()
    shard = world.shard(context.split.test)
    baseline_parts = world.gather(evaluate_linear_baseline(context.config, context.dataset, shard))
    for arm_name in context.config.arms:
        learned_p = dropout_probabilities(context.models[arm_name].generator)
        part = evaluate_arm(context.config, context.dataset, shard, context.out_dir / arm_name, learned_p) if shard else None
        parts = world.gather(part)
        if world.is_main:
            context.evaluations[arm_name] = merge_evaluations(parts, context.split.test)
    if not world.is_main:
        return
    baseline = {k: v for part in baseline_parts for k, v in part.items()}
    baseline = {subject_id: baseline[subject_id] for subject_id in context.split.test}
    timing = {**context.timing, "evaluate": time.perf_counter() - started}
    table = context.config.calibration
    calibration = calibration_record(table.subjects, calibration_subjects(context), table.slice_stride)
    context.metrics = metrics_document(context.evaluations, timing, baseline, context.input_warnings, calibration)
    write_metrics(context.out_dir, context.metrics, metrics_rows(context.evaluations))
    linear = context.metrics["baselines"]["linear_map"]["rmse_mean"]
    for name, arm in context.metrics["arms"].items():
        after = ", ".join(f"{c} {v:.4f}" for c, v in arm["calibration_rms_after"].items())
        context.say(f"arm {name}: RMSE {arm['rmse_mean']:.2f} (per-subject linear map {linear:.2f}), "
                    f"calibration RMS {arm['calibration_rms_before']:.4f} before, after {after}")


def stage_report(context: RunContext) -> None:
    """The paper's figures and ``report.html`` with a slice viewer of every test subject (rank 0)."""
    from uqsynth.report import build_report

    from uqsynth.viewer import columns, sprites, viewer_html

    if context.world.is_main:
        started = time.perf_counter()
        entries = sprites(context.config, context.dataset, context.split.test, context.out_dir)
        viewer = viewer_html(entries, columns(list(context.config.arms)))
        page = build_report(context.out_dir, context.evaluations, context.metrics, viewer)
        context.say(f"report: {page} ({page.stat().st_size / 1e6:.1f} MB, a slice viewer of {len(entries)} test "
                    f"subject(s) built in {time.perf_counter() - started:.1f} s)")


STAGES: tuple[tuple[str, Callable[..., None]], ...] = (
    ("train", stage_train),
    ("sample", stage_sample),
    ("calibrate", stage_calibrate),
    ("certify", stage_certify),
    ("evaluate", stage_evaluate),
    ("report", stage_report),
)


def run_pipeline(
    config_path: str | Path,
    *,
    out: str | Path | None = None,
    overrides: Sequence[str] = (),
    device: str | None = None,
    smoke: bool = False,
    force: bool = False,
) -> int:
    """Validate ``config_path`` (with overrides), prepare ``out``, and run every stage.

    ``force`` replaces a run of another configuration in ``out`` instead of refusing it.
    """
    host = get_host()
    config = load_config(config_path, overrides=overrides, smoke=smoke, host=host)
    if device is not None:
        config.run.device = device
    world = init_world(resolve_device(config.run.device, key="--device" if device is not None else "run.device"))
    try:
        return _run_stages(config, host, world, out, smoke=smoke, force=force)
    finally:
        close_world(world)


def _run_stages(
    config: Config, host: PluginHost, world: World, out: str | Path | None, *, smoke: bool, force: bool
) -> int:
    out_dir = Path(out) if out is not None else Path("runs") / (config.run.name + ("-smoke" if smoke else ""))
    context = RunContext(config, host, out_dir, world.device, world)
    for line in [*config.notes, *describe_run(config, host, out_dir, world.device, smoke, world)]:
        context.say(line)
    prepare(context)
    # Rank 0 alone reads and touches --out: it refuses before touching it (checked again under the lock).
    on_main(world, lambda: check_existing_run(out_dir, config, run_inputs(context), force=force))
    claimed: list[RunLock] = []
    on_main(world, lambda: claimed.append(_claim_run_directory(context, force=force)))
    lock = claimed[0] if claimed else None
    try:
        with recording(out_dir, owner=world.is_main):  # every file of the run goes into its record
            for name, stage in STAGES:
                started = time.perf_counter()
                stage(context)
                context.timing[name] = time.perf_counter() - started
                if world.is_main:
                    atomic_write_text(out_dir / "timing.json", json.dumps(context.timing, indent=2) + "\n")
    finally:
        if lock is not None:
            lock.release()
    return 0


def on_main(world: World, action: Callable[[], object]) -> None:
    """Run ``action`` on rank 0 alone; a user error there is raised on every rank.

    The other ranks learn whether it worked instead of waiting in a barrier
    or a collective that rank 0 never reaches.
    """
    failure: UserError | None = None
    if world.is_main:
        try:
            action()
        except UserError as exc:
            failure = exc
    message = world.broadcast(None if failure is None else str(failure))
    if message is not None:
        raise failure if failure is not None else ConfigError(message)


def _claim_run_directory(context: RunContext, *, force: bool) -> RunLock:
    """Create and lock ``--out``, replace another configuration's run (``--force``), save the configuration."""
    out_dir, config = context.out_dir, context.config
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--out {out_dir}: cannot create the run directory: {exc.strerror or exc}") from None
    lock = RunLock(out_dir)
    try:
        # Checked again under the lock: another run may have written here since.
        if check_existing_run(out_dir, config, run_inputs(context), force=force):
            removed = clear_run(out_dir)
            context.say(f"--force: replaced the run of another configuration or other data in {out_dir} "
                        f"({len(removed)} files it had written)")
        if remove_stale_temporaries(out_dir):
            context.say(f"removed the temporary files of writes an earlier, killed run left in {out_dir}")
        with recording(out_dir, owner=True):
            atomic_write_text(out_dir / "config.toml", dumps_config(config))
    except BaseException:
        lock.release()
        raise
    return lock


def run_report(run_dir: str | Path) -> int:
    """``uqsynth report RUN``: evaluate and report again from the saved predictions (no sampling)."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.toml"
    if not config_path.is_file():
        raise ConfigError(f"{run_dir}: not a run directory (no config.toml)")
    host = get_host()
    config = load_config(config_path, host=host)
    try:
        split = json.loads((run_dir / "split.json").read_text(encoding="utf-8"))
        test_ids = list(split["test"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{run_dir / 'split.json'}: missing or unreadable ({exc})") from None
    timing_path = run_dir / "timing.json"
    timing = json.loads(timing_path.read_text(encoding="utf-8")) if timing_path.is_file() else {}
    context = RunContext(config, host, run_dir, torch.device("cpu"), timing={
        k: v for k, v in timing.items() if k not in ("evaluate", "report")
    })
    # The test subjects are read for the digest check, the baseline, every arm and the viewer: once each.
    context.dataset = CachedDataset(build_dataset(config, host), test_ids, max_bytes=config.data.cache_mb * 2**20)
    context.split = Split(train=list(split.get("train", [])), test=test_ids, calibration=list(split.get("calibration", [])))
    context.input_warnings = {str(k): list(v) for k, v in (split.get("input_warnings") or {}).items()}
    # The split this configuration gives the subjects the run recorded must be split.json's, and the test
    # subjects (all that is read here) must be as they were: else the wrong subjects or data would be scored.
    recorded = sorted(split.get("sha256") or {*test_ids, *split.get("train", []), *split.get("calibration", [])})
    expected = dataclasses.replace(context, split=subject_split(config, recorded))
    present = set(context.dataset.subject_ids())
    expected.digests = {s: content_digest(context.dataset.load(s)) for s in expected.split.test if s in present}
    inputs = run_inputs(expected)
    stale = inputs_difference(run_dir, RunInputs(
        [s for s in recorded if s in present or s not in expected.split.test], inputs.roles, inputs.digests
    ))
    for arm_name in config.arms:
        stale = stale or outputs_difference(run_dir / arm_name, arm_name)
    if stale is not None:
        raise ConfigError(f"{run_dir}: {stale}; `uqsynth run` with --force retrains it")
    for arm_name in config.arms:
        arm = load_arm(run_dir / arm_name, host)
        context.models[arm_name] = ArmModels(arm.generator, None, None, arm.likelihood)
    with recording(run_dir) if (run_dir / RECORD).exists() else contextlib.nullcontext():
        stage_evaluate(context)
        stage_report(context)
    return 0
