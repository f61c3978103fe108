"""Training one arm of a Bayesian conditional GAN (pix2pix's loop, made explicit).

Each step draws one generator output with the stochastic layers sampling
(as the paper trains), updates the discriminator on real vs. fake pairs
(loss halved, as pix2pix does), then the generator on the adversarial loss
plus ``lambda_l1 *`` the arm's likelihood loss (pix2pix's L1 for the
paper's ``l1``) plus ``lambda_kl * sum of the stochastic layers'
regularizers``. The discriminator judges the likelihood's mean image.

Checkpoints are written atomically after every epoch and hold everything
needed to continue exactly (weights, optimizer states, the moving average of
the generator's weights when ``train.ema_decay`` asks for one, every
process's RNG states), as safetensors with a checksum beside them
(:mod:`uqsynth.model_files`), so loading one never unpickles code. The
final generator is also saved on its own for sampling and sharing.

A run that diverges stops with :class:`~uqsynth.errors.TrainingDiverged`
(one line naming the arm, the epoch, the step and the loss or tensor, and
what to change) at the first step whose losses are not finite, or at the end
of an epoch whose weights are not (a huge learning rate can overflow a
BatchNorm statistic while every loss is still finite). Nothing of that
epoch is logged or saved: the last good epoch's checkpoint stays as it was.
"""

from __future__ import annotations

import contextlib
import csv
import math
import random
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from uqsynth._files import write_csv
from uqsynth.config import ArmConfig, Config, TrainConfig
from uqsynth.distributed import SINGLE, World
from uqsynth.errors import ConfigError, TrainingDiverged
from uqsynth.layers.base import sampling, stochastic_layers, total_regularizer
from uqsynth.likelihoods import Likelihood
from uqsynth.losses import AdversarialLoss, discriminator_objective, generator_objective
from uqsynth.model_files import load_state, nonfinite_tensor, save_state, save_tensors, state_tensors
from uqsynth.models.base import Discriminator, Generator
from uqsynth.plugins import PluginHost

CHECKPOINT = "checkpoint.safetensors"
LEGACY_CHECKPOINT = "checkpoint.pt"  # pickle-based, written before 0.2; never loaded
GENERATOR_WEIGHTS = "generator.safetensors"
TRAIN_LOG = "train_log.csv"

#: The losses of a step (:meth:`Trainer.step`), as a divergence names them, in the order they are computed.
LOSS_NAMES = {
    "loss_d": "discriminator loss",
    "loss_g_adversarial": "generator's adversarial loss",
    "loss_g_likelihood": "generator's likelihood loss",
    "loss_g_kl": "stochastic layers' KL term",
    "loss_g_total": "generator's total loss",
}


@dataclass
class ArmModels:
    """The networks, the likelihood of the generator's output and the adversarial loss of one arm."""

    generator: Generator
    discriminator: Discriminator
    adversarial_loss: AdversarialLoss
    likelihood: Likelihood


def build_generator(config: Config, arm: ArmConfig, host: PluginHost) -> Generator:
    """The arm's generator with its stochastic layers, freshly initialized.

    It gets one input channel (the source contrast) and as many output
    channels as the arm's likelihood needs. Layers that regularize the
    weights around them get them now, so a generator that attached the
    wrong kind is refused here, before training, not at the first step.
    """
    generator = host["generator"].build(
        config.model.generator,
        image_size=config.data.image_size,
        stochastic_layer=lambda: host["stochastic_layer"].build(arm.stochastic_layer),
        positions=tuple(arm.positions),
        in_channels=1,
        out_channels=build_likelihood(arm, host).channels,
    )
    for stochastic in stochastic_layers(generator):
        stochastic.check_attached()
    return generator


def build_likelihood(arm: ArmConfig, host: PluginHost) -> Likelihood:
    """The arm's likelihood (``arms.<name>.likelihood``; the paper's ``l1`` by default)."""
    return host["likelihood"].build(arm.likelihood)


def build_arm(config: Config, arm_name: str, host: PluginHost) -> ArmModels:
    """Build the arm's networks and check they accept slices of ``data.image_size``.

    A plugin refusing its arguments (``ValueError``/``TypeError``, e.g. a
    U-Net asked for a size that is not a power of two) is a configuration
    error naming the arm and the plugin.
    """
    spec = config.model
    arm = config.arms[arm_name]
    try:
        models = ArmModels(
            generator=build_generator(config, arm, host),
            discriminator=host["discriminator"].build(spec.discriminator, in_channels=2),
            adversarial_loss=host["adversarial_loss"].build(spec.adversarial_loss),
            likelihood=build_likelihood(arm, host),
        )
    except (ValueError, TypeError) as exc:
        raise ConfigError(
            f"arms.{arm_name}: cannot build generator {spec.generator.name} / discriminator "
            f"{spec.discriminator.name} at data.image_size {config.data.image_size}: {exc}"
        ) from None
    check_image_size(models, config.data.image_size)
    return models


def check_image_size(models: ArmModels, size: int) -> None:
    """A dry forward pass at ``size``, so a too-small slice is a configuration error, not a crash mid-training."""
    probe = torch.zeros(2, models.generator.in_channels, size, size)
    networks = (("model.generator", models.generator), ("model.discriminator", models.discriminator))
    for key, network in networks:
        was_training = network.training
        network.eval()
        try:
            with torch.no_grad():
                if key == "model.generator":
                    output = network(probe)
                    if output.shape[-2:] != probe.shape[-2:]:
                        raise RuntimeError(f"it returned {tuple(output.shape[-2:])} slices")
                    channels = models.likelihood.channels
                    if output.shape[1] != channels:
                        raise RuntimeError(f"it returned {output.shape[1]} channels where the arm's likelihood "
                                           f"needs {channels} (does it honour out_channels?)")
                else:
                    network(probe, probe)
        except (RuntimeError, ValueError) as exc:
            message = str(exc).splitlines()[0]
            raise ConfigError(
                f"{key} ({type(network).__name__}) cannot take {size}x{size} slices (data.image_size): {message}"
            ) from None
        finally:
            network.train(was_training)


def set_requires_grad(module: nn.Module, flag: bool) -> None:
    """Freeze or unfreeze a network (pix2pix freezes D while updating G)."""
    for parameter in module.parameters():
        parameter.requires_grad_(flag)


def dropout_probabilities(generator: nn.Module) -> list[float]:
    """Learned dropout probability of each stochastic layer that has one, in order."""
    values = []
    for layer in stochastic_layers(generator):
        p = layer.dropout_probability()
        if p is not None:
            values.append(float(p.detach()))
    return values


def learning_rate_factor(train: TrainConfig, epoch: int, step: int, steps_per_epoch: int) -> float:
    """The multiple of ``train.lr`` for step ``step`` (0-based) of epoch ``epoch`` (1-based).

    1 until the last ``train.lr_decay_epochs`` epochs, then falling linearly
    with every step, to ``1 / decay_steps`` at the last one (pix2pix's
    ``linear`` policy, per step rather than per epoch so that a short run
    decays smoothly). A pure function of the position, so a resumed run
    needs no scheduler state to continue exactly.
    """
    decay_steps = train.lr_decay_epochs * steps_per_epoch
    if decay_steps == 0:
        return 1.0
    remaining = (train.epochs - epoch + 1) * steps_per_epoch - step
    return min(1.0, remaining / decay_steps)


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def rng_state() -> dict:
    """This process's python, numpy and torch random states, as tensors and scalars (storable without pickle)."""
    version, python_state, gauss = random.getstate()
    _, numpy_keys, numpy_pos, has_gauss, cached_gauss = np.random.get_state()
    return {
        "python": torch.tensor(python_state, dtype=torch.int64),
        "python_version": version,
        "python_gauss": gauss,
        "numpy": torch.from_numpy(numpy_keys.astype(np.int64)),
        "numpy_pos": int(numpy_pos),
        "numpy_gauss": [int(has_gauss), float(cached_gauss)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate((state["python_version"], tuple(state["python"].tolist()), state["python_gauss"]))
    has_gauss, cached_gauss = state["numpy_gauss"]
    np.random.set_state(
        ("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], has_gauss, cached_gauss)
    )
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed python, numpy and torch; rank 0 uses ``seed`` itself, other ranks a stream derived from both.

    Ranks need different random crops and dropout masks; their weights start
    equal regardless (DistributedDataParallel copies rank 0's).
    """
    if rank:
        seed = int(np.random.SeedSequence([seed, rank]).generate_state(1, dtype=np.uint64)[0] % 2**63)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """Trains one arm, epoch by epoch, resuming from its checkpoint when present.

    With several processes (``world``), both networks are wrapped in
    ``DistributedDataParallel``: every process trains on its own share of
    each epoch's slices (a ``DistributedSampler`` seeded by the run seed and
    the epoch) with ``train.batch_size`` slices per step, so the effective
    batch is ``batch_size x world.size``; gradients are averaged across
    processes and the learning rate is used as configured. Rank 0 writes
    the log, the checkpoint (with every rank's random state) and the weights.
    """

    def __init__(
        self,
        config: Config,
        arm_name: str,
        models: ArmModels,
        train_set: torch.utils.data.Dataset,
        out_dir: Path,
        device: torch.device,
        log: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
        world: World = SINGLE,
        progress: bool = True,
    ) -> None:
        self.config = config
        self.arm_name = arm_name
        self.arm = config.arms[arm_name]
        self.models = models
        self.train_set = train_set
        self.out_dir = out_dir
        self.device = device
        self.world = world
        self.log = log if world.is_main else lambda line: None
        self.progress = progress and world.is_main  # a step bar: one process alone draws on the terminal
        train = config.train
        self.lambda_kl = train.lambda_kl if self.arm.lambda_kl is None else self.arm.lambda_kl
        betas = tuple(train.betas)
        self.generator = models.generator.to(device)
        self.discriminator = models.discriminator.to(device)
        if world.distributed and train.sync_batchnorm:  # on GPUs: prepare() refuses it on CPUs
            # Converts the BatchNorm children in place (the roots are not BatchNorm layers).
            nn.SyncBatchNorm.convert_sync_batchnorm(self.generator)
            nn.SyncBatchNorm.convert_sync_batchnorm(self.discriminator)
        # What the training step calls: the networks themselves, or their DDP wrappers, which
        # average gradients across processes. Everything else uses the networks directly.
        self.train_generator: nn.Module = self._parallel(self.generator)
        self.train_discriminator: nn.Module = self._parallel(self.discriminator)
        fused = {"fused": True} if train.fused_adam else {}  # else torch's default implementation
        self.optimizer_g = torch.optim.Adam(self.generator.parameters(), lr=train.lr, betas=betas, **fused)
        self.optimizer_d = torch.optim.Adam(self.discriminator.parameters(), lr=train.lr, betas=betas, **fused)
        self.scaler = torch.amp.GradScaler(device.type, enabled=train.precision == "fp16")
        # An exponential moving average of the generator (weights and BatchNorm statistics), updated
        # after every generator step. Adversarial training at a high learning rate makes the weights
        # oscillate from step to step; their average is the steadier estimate, and it replaces the
        # trained weights when the arm is done (:meth:`use_average`).
        self.average: AveragedModel | None = None
        if train.ema_decay > 0:
            self.average = AveragedModel(
                self.generator, multi_avg_fn=get_ema_multi_avg_fn(train.ema_decay), use_buffers=True
            )
        self.epoch = 0

    def _parallel(self, network: nn.Module) -> nn.Module:
        if not self.world.distributed:
            return network
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(network, device_ids=device_ids)

    # ------------------------------------------------------------------ steps

    def set_learning_rate(self, factor: float) -> None:
        """Both optimizers at ``factor * train.lr`` (see :func:`learning_rate_factor`)."""
        for optimizer in (self.optimizer_g, self.optimizer_d):
            for group in optimizer.param_groups:
                group["lr"] = self.config.train.lr * factor

    def step(self, batch: dict) -> dict[str, float]:
        """One discriminator and one generator update on ``batch``."""
        source = batch["source"].to(self.device, non_blocking=True)
        real = batch["target"].to(self.device, non_blocking=True)
        precision = self.config.train.precision
        likelihood = self.models.likelihood
        with _autocast(self.device, precision), sampling(self.generator):
            output = self.train_generator(source)
            fake = likelihood.mean(output)  # the discriminator judges the mean image only

        set_requires_grad(self.discriminator, True)
        self.optimizer_d.zero_grad(set_to_none=True)
        with _autocast(self.device, precision):
            loss_d = discriminator_objective(
                self.models.adversarial_loss,
                self.train_discriminator(source, real),
                self.train_discriminator(source, fake.detach()),
            )
        self.scaler.scale(loss_d).backward()
        self.scaler.step(self.optimizer_d)

        set_requires_grad(self.discriminator, False)
        self.optimizer_g.zero_grad(set_to_none=True)
        with _autocast(self.device, precision):
            # The frozen D is called unwrapped: its parameters get no gradient here, which
            # DDP's wrapper would otherwise wait for. (Its buffers are synchronized by the wrapper.)
            adversarial = self.models.adversarial_loss.generator_loss(self.discriminator(source, fake))
            terms = generator_objective(
                adversarial, likelihood.loss(output.float(), real), total_regularizer(self.generator),
                lambda_l1=self.config.train.lambda_l1, lambda_kl=self.lambda_kl,
            )
        self.scaler.scale(terms["total"]).backward()
        self.scaler.step(self.optimizer_g)
        self.scaler.update()
        if self.average is not None:
            self.average.update_parameters(self.generator)
        losses = {f"loss_g_{k}": float(v.detach()) for k, v in terms.items()}
        losses["loss_d"] = float(loss_d.detach())
        return losses

    def batches(self, epoch: int) -> Iterator[dict]:
        """The epoch's batches (this rank's share), in an order fixed by the run seed and the epoch."""
        pin = self.device.type == "cuda"
        batch_size = self.config.train.batch_size
        if self.world.distributed:
            sampler = DistributedSampler(
                self.train_set, num_replicas=self.world.size, rank=self.world.rank, shuffle=True,
                seed=self.config.run.seed,
            )
            sampler.set_epoch(epoch)
            loader = DataLoader(self.train_set, batch_size=batch_size, sampler=sampler, num_workers=0, pin_memory=pin)
        else:
            order = torch.Generator().manual_seed(self.config.run.seed * 1000 + epoch)
            loader = DataLoader(
                self.train_set, batch_size=batch_size, shuffle=True, generator=order, num_workers=0, pin_memory=pin
            )
        for index, batch in enumerate(loader):
            if index >= self.steps_per_epoch():
                return
            yield batch

    def steps_per_epoch(self) -> int:
        """Every batch of this rank's share of the training set, or ``train.max_steps_per_epoch`` when smaller.

        The distributed sampler pads the shares to equal length, so every rank takes the same number of steps.
        """
        share = -(-len(self.train_set) // self.world.size)
        batches = -(-share // self.config.train.batch_size)
        cap = self.config.train.max_steps_per_epoch
        return min(batches, cap) if cap else batches

    # ------------------------------------------------------------------ epochs

    def fit(self) -> int:
        """Train the remaining epochs, writing the log and a checkpoint after each.

        Returns:
            How many epochs were trained now (0 when the arm was already done).
        """
        arm_dir = self.out_dir
        arm_dir.mkdir(parents=True, exist_ok=True)
        epochs = self.config.train.epochs
        if self.load_checkpoint():
            if self.epoch >= epochs:
                self.log(f"arm {self.arm_name}: already trained ({self.epoch} epochs), skipping")
                self.use_average()
                if self.world.is_main and not (self.out_dir / GENERATOR_WEIGHTS).exists():
                    self.save_generator()  # killed between the checkpoint and the export
                return 0
            self.log(f"arm {self.arm_name}: resuming after epoch {self.epoch} of {epochs}")
        else:
            # A fresh arm's crops and masks must not depend on what ran before it in this process.
            seed_everything(self.config.run.seed, self.world.rank)
        if self.world.is_main:
            self.discard_outputs()
        self.world.barrier()
        if self.world.distributed:
            batch = self.config.train.batch_size
            self.log(
                f"arm {self.arm_name}: DistributedDataParallel over {self.world.size} processes "
                f"({self.world.backend}{', SyncBatchNorm' if self.config.train.sync_batchnorm else ''}); "
                f"batch {batch} per process, effective batch {batch * self.world.size}; learning rate "
                f"{self.config.train.lr:g} as configured (not scaled with the effective batch); "
                f"{self.steps_per_epoch()} steps per epoch"
            )
        self.generator.train()
        self.discriminator.train()
        steps = self.steps_per_epoch()
        first = self.epoch + 1
        for epoch in range(first, epochs + 1):
            started = time.perf_counter()
            totals: dict[str, float] = {}
            bar = tqdm(self.batches(epoch), total=steps, desc=f"{self.arm_name} {epoch}/{epochs}",
                       unit="step", leave=False, file=sys.stderr, dynamic_ncols=True,
                       disable=not self.progress)
            count = 0
            try:
                for batch in bar:
                    self.set_learning_rate(learning_rate_factor(self.config.train, epoch, count, steps))
                    losses = self.step(batch)
                    count += 1
                    self.check_losses(losses, epoch, count)
                    for key, value in losses.items():
                        totals[key] = totals.get(key, 0.0) + value
                    shown = {"G": losses["loss_g_total"], "D": losses["loss_d"], "NLL": losses["loss_g_likelihood"]}
                    probabilities = dropout_probabilities(self.generator)
                    if probabilities:
                        shown["p"] = "/".join(f"{p:.3f}" for p in probabilities)
                    bar.set_postfix({k: f"{v:.3f}" if isinstance(v, float) else v for k, v in shown.items()})
            finally:
                bar.close()  # also when a step fails: the error line must not land on the bar's line
            self.check_weights(epoch, count)  # before the log and the checkpoint: neither gets this epoch
            self.epoch = epoch
            totals = self._summed_over_ranks({**totals, "count": float(count)})
            count = totals.pop("count")
            row = {"epoch": epoch, **{k: v / max(count, 1) for k, v in totals.items()}}
            for index, p in enumerate(dropout_probabilities(self.generator), start=1):
                row[f"p_{index}"] = p
            row["lr"] = self.optimizer_g.param_groups[0]["lr"]  # at the epoch's last step
            row["seconds"] = time.perf_counter() - started
            if self.world.is_main:  # the log first: a rerun of this epoch replaces its row
                self.append_log(row)
            self.save_checkpoint()  # collective: every rank sends its random state
            probabilities = dropout_probabilities(self.generator)
            p_text = f", p {' '.join(f'{p:.4f}' for p in probabilities)}" if probabilities else ""
            self.log(
                f"arm {self.arm_name} epoch {epoch}/{epochs}: G {row['loss_g_total']:.4f} "
                f"(likelihood {row['loss_g_likelihood']:.4f}, KL {row['loss_g_kl']:.3g}), D {row['loss_d']:.4f}{p_text}, "
                f"{row['seconds']:.1f} s"
            )
        self.use_average()
        if self.world.is_main:
            self.save_generator()
        self.world.barrier()
        return epochs - first + 1

    def check_losses(self, losses: dict[str, float], epoch: int, step: int) -> None:
        """Stop at the first step (1-based) of ``epoch`` whose losses are not all finite.

        Raises:
            TrainingDiverged: Naming the arm, epoch, step and loss, on every process.
        """
        bad = [key for key in LOSS_NAMES if key in losses and not math.isfinite(losses[key])]
        problem = f"the {LOSS_NAMES[bad[0]]} ({bad[0]}) is {losses[bad[0]]}" if bad else None
        self._stop_if_diverged(problem, epoch, f"at step {step}")

    def check_weights(self, epoch: int, steps: int) -> None:
        """Stop before logging or saving an epoch whose state (weights, statistics, optimizer) is not finite.

        Raises:
            TrainingDiverged: Naming the arm, the epoch and the tensor, on every process.
        """
        problem = nonfinite_tensor(state_tensors(self.checkpoint_state()))
        self._stop_if_diverged(problem, epoch, f"after step {steps}")

    def _stop_if_diverged(self, problem: str | None, epoch: int, when: str) -> None:
        """Raise :class:`TrainingDiverged` for ``problem``, on every process when any process has one.

        Under torchrun the verdict is summed over processes (one number), so
        no process goes on to wait for the others at the next collective.
        """
        if self.world.distributed:
            flagged = int(self.world.all_reduce_sum(np.array(problem is not None, dtype=np.int64)))
            if flagged and problem is None:
                problem = "a loss or weight of another process is not finite"
        if problem is None:
            return
        train = self.config.train
        remedy = f"lower train.lr (now {train.lr:g})"
        if train.precision == "fp16":
            remedy += ' or use train.precision = "bf16" or "fp32"'
        remedy += " and rerun with --force"
        if self.epoch:
            remedy += (f", or keep the {self.epoch} good epoch(s) with --set train.epochs={self.epoch} "
                       f"(their checkpoint is kept)")
        raise TrainingDiverged(
            f"arm {self.arm_name}: training diverged in epoch {epoch} {when}: {problem}; {remedy}; "
            f"nothing of epoch {epoch} was saved"
        )

    def _summed_over_ranks(self, values: dict[str, float]) -> dict[str, float]:
        """Per-epoch loss sums added over all processes (the same keys on every rank), for the log."""
        keys = sorted(values)
        summed = self.world.all_reduce_sum(np.array([values[k] for k in keys], dtype=np.float64))
        return dict(zip(keys, summed.tolist()))

    # ------------------------------------------------------------------ files

    def discard_outputs(self) -> None:
        """Delete what the previous weights produced, before the weights change.

        The exported generator, its predictions and calibrators belong to
        the epoch they were made at; a run that trains further (more epochs,
        or a resume) removes them first, so a kill at any later point cannot
        leave them beside newer weights.
        """
        for name in (GENERATOR_WEIGHTS, GENERATOR_WEIGHTS + ".sha256"):
            (self.out_dir / name).unlink(missing_ok=True)
        for folder in ("predictions", "calibrators"):
            shutil.rmtree(self.out_dir / folder, ignore_errors=True)

    def append_log(self, row: dict) -> None:
        """Rewrite ``train_log.csv`` atomically with ``row`` appended."""
        path = self.out_dir / TRAIN_LOG
        rows = []
        if path.exists():
            with open(path, newline="") as handle:
                rows = [r for r in csv.DictReader(handle) if int(r["epoch"]) < row["epoch"]]
        rows.append(row)
        write_csv(path, rows)

    def checkpoint_state(self) -> dict:
        """What the checkpoint holds but the random states: weights, optimizer states, the weight average."""
        state = {
            "epoch": self.epoch,
            "world_size": self.world.size,
            "generator": self.generator.state_dict(),
            "discriminator": self.discriminator.state_dict(),
            "optimizer_g": self.optimizer_g.state_dict(),
            "optimizer_d": self.optimizer_d.state_dict(),
            "scaler": self.scaler.state_dict(),
        }
        if self.average is not None:
            state["generator_average"] = self.average.state_dict()
        return state

    def save_checkpoint(self) -> None:
        """Rank 0 writes the checkpoint, with the random state of every rank (a collective call)."""
        rng = self.world.gather(rng_state())
        if not self.world.is_main:
            return
        save_state(self.out_dir / CHECKPOINT, {**self.checkpoint_state(), "rng": rng}, {"arm": self.arm_name})

    def load_checkpoint(self) -> bool:
        """Continue from the last completed epoch, if a checkpoint exists (every rank reads it).

        Each rank gets back its own random state when the number of
        processes is the one that wrote the checkpoint; otherwise they are
        reseeded from the run seed, the rank and the epoch, and the log says
        that the rest of the run will not repeat an uninterrupted one.
        """
        if (self.out_dir / LEGACY_CHECKPOINT).exists():
            raise ConfigError(
                f"{self.out_dir / LEGACY_CHECKPOINT}: a pickle-based checkpoint of uqsynth < 0.2, which this "
                "version does not load (it could run code); start a new --out"
            )
        path = self.out_dir / CHECKPOINT
        if not path.exists():
            return False
        state = load_state(path, what=f"arm {self.arm_name}: checkpoint", map_location=self.device)
        self.generator.load_state_dict(state["generator"])
        self.discriminator.load_state_dict(state["discriminator"])
        self.optimizer_g.load_state_dict(state["optimizer_g"])
        self.optimizer_d.load_state_dict(state["optimizer_d"])
        self.scaler.load_state_dict(state["scaler"])
        if self.average is not None:
            if "generator_average" not in state:
                raise ConfigError(
                    f"{path}: this checkpoint was trained without train.ema_decay, so it has no weight average "
                    "to continue; resume with train.ema_decay = 0 or start a new --out"
                )
            self.average.load_state_dict(state["generator_average"])
        self.epoch = int(state["epoch"])
        if int(state["world_size"]) == self.world.size:
            set_rng_state(state["rng"][self.world.rank])
        else:
            self.log(
                f"arm {self.arm_name}: checkpoint written by {state['world_size']} process(es), resuming with "
                f"{self.world.size}: random streams reseeded, so the rest differs from an uninterrupted run"
            )
            seed_everything(self.config.run.seed * 1000 + self.epoch, self.world.rank)
        return True

    def use_average(self) -> None:
        """Put the moving average's weights into the generator (with ``train.ema_decay``; else nothing).

        Called once the arm is trained, so the exported weights and every later stage use the average.
        """
        if self.average is not None:
            self.generator.load_state_dict(self.average.module.state_dict())

    def save_generator(self) -> None:
        """The trained generator as safetensors with its checksum (loads without executing code)."""
        weights = {k: v.detach().cpu().contiguous() for k, v in self.generator.state_dict().items()}
        save_tensors(self.out_dir / GENERATOR_WEIGHTS, weights, {"arm": self.arm_name, "epochs": str(self.epoch)})
