"""Training one arm of a Bayesian conditional GAN (pix2pix's loop, made explicit).

Each step draws one generator output with the stochastic layers sampling
(as the paper trains), updates the discriminator on real vs. fake pairs
(loss halved, as pix2pix does), then the generator on the adversarial loss
plus ``lambda_l1 * L1`` plus ``lambda_kl * sum of the stochastic layers'
regularizers``.

Checkpoints are written atomically after every epoch and hold everything
needed to continue exactly (weights, optimizer states, RNG states), loaded
with ``torch.load(weights_only=True)`` so no code is ever unpickled. The
final generator is also saved as safetensors for sampling and sharing.
"""

from __future__ import annotations

import contextlib
import csv
import io
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from uqsynth._files import atomic_path, atomic_write_text
from uqsynth.config import ArmConfig, Config
from uqsynth.errors import ConfigError
from uqsynth.layers.base import sampling, stochastic_layers, total_regularizer
from uqsynth.losses import AdversarialLoss, discriminator_objective, generator_objective
from uqsynth.models.base import Discriminator, Generator
from uqsynth.plugins import PluginHost

CHECKPOINT = "checkpoint.pt"
GENERATOR_WEIGHTS = "generator.safetensors"
TRAIN_LOG = "train_log.csv"


@dataclass
class ArmModels:
    """The networks and loss of one arm."""

    generator: Generator
    discriminator: Discriminator
    adversarial_loss: AdversarialLoss


def build_generator(config: Config, arm: ArmConfig, host: PluginHost) -> Generator:
    """The arm's generator with its stochastic layers, freshly initialized."""
    layer = arm.stochastic_layer
    spec = config.model.generator
    return host["generator"].create(
        spec.name,
        image_size=config.data.image_size,
        stochastic_layer=lambda: host["stochastic_layer"].create(layer.name, **layer.params),
        positions=tuple(arm.positions),
        **spec.params,
    )


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
            discriminator=host["discriminator"].create(
                spec.discriminator.name, in_channels=2, **spec.discriminator.params
            ),
            adversarial_loss=host["adversarial_loss"].create(spec.adversarial_loss.name, **spec.adversarial_loss.params),
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


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _rng_state() -> dict:
    return {
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "python_gauss": random.getstate()[2],
        "numpy": np.random.get_state()[1].tolist(),
        "numpy_pos": int(np.random.get_state()[2]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict) -> None:
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """Trains one arm, epoch by epoch, resuming from its checkpoint when present."""

    def __init__(
        self,
        config: Config,
        arm_name: str,
        models: ArmModels,
        train_set: torch.utils.data.Dataset,
        out_dir: Path,
        device: torch.device,
        log: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
    ) -> None:
        self.config = config
        self.arm_name = arm_name
        self.arm = config.arms[arm_name]
        self.models = models
        self.train_set = train_set
        self.out_dir = out_dir
        self.device = device
        self.log = log
        train = config.train
        self.lambda_kl = train.lambda_kl if self.arm.lambda_kl is None else self.arm.lambda_kl
        betas = tuple(train.betas)
        self.generator = models.generator.to(device)
        self.discriminator = models.discriminator.to(device)
        self.optimizer_g = torch.optim.Adam(self.generator.parameters(), lr=train.lr, betas=betas)
        self.optimizer_d = torch.optim.Adam(self.discriminator.parameters(), lr=train.lr, betas=betas)
        self.scaler = torch.amp.GradScaler(device.type, enabled=train.precision == "fp16")
        self.epoch = 0

    # ------------------------------------------------------------------ steps

    def step(self, batch: dict) -> dict[str, float]:
        """One discriminator and one generator update on ``batch``."""
        source = batch["source"].to(self.device, non_blocking=True)
        real = batch["target"].to(self.device, non_blocking=True)
        precision = self.config.train.precision
        with _autocast(self.device, precision), sampling(self.generator):
            fake = self.generator(source)

        set_requires_grad(self.discriminator, True)
        self.optimizer_d.zero_grad(set_to_none=True)
        with _autocast(self.device, precision):
            loss_d = discriminator_objective(
                self.models.adversarial_loss,
                self.discriminator(source, real),
                self.discriminator(source, fake.detach()),
            )
        self.scaler.scale(loss_d).backward()
        self.scaler.step(self.optimizer_d)

        set_requires_grad(self.discriminator, False)
        self.optimizer_g.zero_grad(set_to_none=True)
        with _autocast(self.device, precision):
            adversarial = self.models.adversarial_loss.generator_loss(self.discriminator(source, fake))
            terms = generator_objective(
                adversarial, fake.float(), real, total_regularizer(self.generator),
                lambda_l1=self.config.train.lambda_l1, lambda_kl=self.lambda_kl,
            )
        self.scaler.scale(terms["total"]).backward()
        self.scaler.step(self.optimizer_g)
        self.scaler.update()
        losses = {f"loss_g_{k}": float(v.detach()) for k, v in terms.items()}
        losses["loss_d"] = float(loss_d.detach())
        return losses

    def batches(self, epoch: int) -> Iterator[dict]:
        """The epoch's batches, in an order fixed by the run seed and the epoch."""
        order = torch.Generator().manual_seed(self.config.run.seed * 1000 + epoch)
        loader = DataLoader(
            self.train_set, batch_size=self.config.train.batch_size, shuffle=True, generator=order,
            num_workers=0, pin_memory=self.device.type == "cuda",
        )
        for index, batch in enumerate(loader):
            if index >= self.steps_per_epoch():
                return
            yield batch

    def steps_per_epoch(self) -> int:
        """Every batch of the training set, or ``train.max_steps_per_epoch`` when smaller."""
        batches = -(-len(self.train_set) // self.config.train.batch_size)
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
                if not (self.out_dir / GENERATOR_WEIGHTS).exists():  # killed between checkpoint and export
                    self.save_generator()
                return 0
            self.log(f"arm {self.arm_name}: resuming after epoch {self.epoch} of {epochs}")
        else:
            # A fresh arm's crops and masks must not depend on what ran before it in this process.
            seed_everything(self.config.run.seed)
        self.generator.train()
        self.discriminator.train()
        steps = self.steps_per_epoch()
        first = self.epoch + 1
        for epoch in range(first, epochs + 1):
            started = time.perf_counter()
            totals: dict[str, float] = {}
            bar = tqdm(self.batches(epoch), total=steps, desc=f"{self.arm_name} {epoch}/{epochs}",
                       unit="step", leave=False, file=sys.stderr, dynamic_ncols=True)
            count = 0
            for batch in bar:
                losses = self.step(batch)
                count += 1
                for key, value in losses.items():
                    totals[key] = totals.get(key, 0.0) + value
                shown = {"G": losses["loss_g_total"], "D": losses["loss_d"], "L1": losses["loss_g_l1"]}
                probabilities = dropout_probabilities(self.generator)
                if probabilities:
                    shown["p"] = "/".join(f"{p:.3f}" for p in probabilities)
                bar.set_postfix({k: f"{v:.3f}" if isinstance(v, float) else v for k, v in shown.items()})
            bar.close()
            self.epoch = epoch
            row = {"epoch": epoch, **{k: v / max(count, 1) for k, v in totals.items()}}
            for index, p in enumerate(dropout_probabilities(self.generator), start=1):
                row[f"p_{index}"] = p
            row["seconds"] = time.perf_counter() - started
            self.append_log(row)
            self.save_checkpoint()
            probabilities = dropout_probabilities(self.generator)
            p_text = f", p {' '.join(f'{p:.4f}' for p in probabilities)}" if probabilities else ""
            self.log(
                f"arm {self.arm_name} epoch {epoch}/{epochs}: G {row['loss_g_total']:.4f} "
                f"(L1 {row['loss_g_l1']:.4f}, KL {row['loss_g_kl']:.3g}), D {row['loss_d']:.4f}{p_text}, "
                f"{row['seconds']:.1f} s"
            )
        self.save_generator()
        return epochs - first + 1

    # ------------------------------------------------------------------ files

    def append_log(self, row: dict) -> None:
        """Rewrite ``train_log.csv`` atomically with ``row`` appended."""
        path = self.out_dir / TRAIN_LOG
        rows = []
        if path.exists():
            with open(path, newline="") as handle:
                rows = [r for r in csv.DictReader(handle) if int(r["epoch"]) < row["epoch"]]
        rows.append(row)
        fields = list(dict.fromkeys(key for r in rows for key in r))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(path, buffer.getvalue())

    def save_checkpoint(self) -> None:
        state = {
            "epoch": self.epoch,
            "generator": self.generator.state_dict(),
            "discriminator": self.discriminator.state_dict(),
            "optimizer_g": self.optimizer_g.state_dict(),
            "optimizer_d": self.optimizer_d.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": _rng_state(),
        }
        with atomic_path(self.out_dir / CHECKPOINT) as tmp:
            torch.save(state, tmp)

    def load_checkpoint(self) -> bool:
        path = self.out_dir / CHECKPOINT
        if not path.exists():
            return False
        state = torch.load(path, map_location=self.device, weights_only=True)
        self.generator.load_state_dict(state["generator"])
        self.discriminator.load_state_dict(state["discriminator"])
        self.optimizer_g.load_state_dict(state["optimizer_g"])
        self.optimizer_d.load_state_dict(state["optimizer_d"])
        self.scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
        self.epoch = int(state["epoch"])
        return True

    def save_generator(self) -> None:
        """The trained generator as safetensors (loads without executing code)."""
        weights = {k: v.detach().cpu().contiguous() for k, v in self.generator.state_dict().items()}
        with atomic_path(self.out_dir / GENERATOR_WEIGHTS) as tmp:
            save_file(weights, str(tmp), metadata={"arm": self.arm_name, "epochs": str(self.epoch)})
