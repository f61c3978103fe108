"""The Python half of ``benchmarks/gpu_check.sh``: the device, the model's arm, the training speed, the one JSON file.

Why a script and not a suite: a machine with a GPU is lent for minutes, so
its figures must come from one command that needs no decisions; the shell
script runs the stages (the quick sampling suite, ``uqsynth run`` and
``uqsynth predict`` as a user runs them) and this module measures what no
command does (steps per second) and gathers the rest::

    python -m benchmarks._gpu_check device --device auto     # prints cuda, cuda:1 or cpu; error: on a bad one
    python -m benchmarks._gpu_check arm                      # --set arms={mc_dropout=...}: the main job's arm alone
    python -m benchmarks._gpu_check train --device cuda --image-size 256 --ngf 64 --ndf 64 --batch-size 16 \\
        --steps 20 --warmup 5 --out training.json
    python -m benchmarks._gpu_check report --dir OUT ...        # OUT/gpu_check.json

torch and uqsynth are imported by the subcommands that need them (each
start-up costs seconds on a small CPU, and ``arm`` needs neither). Errors
print one ``error: ...`` line and exit with status 2, as the CLI's do.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import platform
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAIN_JOB = ROOT / "plugins" / "bcgan_t1t2.toml"
ARM = "mc_dropout"  # the paper's MC-dropout arm: what the training measurement trains, and what predict samples
PRECISIONS = ("fp32", "bf16")
#: The training measurement's phantom subjects (their slices are resized to the networks' size).
TRAIN_SHAPE = [48, 48, 24]
#: What the sampling section keeps of each benchmark's extra_info (when present).
SAMPLING_FIELDS = (
    "seconds", "slice_samples_per_s", "peak_memory_mb", "speedup_vs_naive_loop", "speedup_vs_batch_repeat",
    "mean_rel_err", "std_rel_err", "achieved_tflops", "peak_tflops", "dtype",
)


class CheckError(Exception):
    """A problem this module reports as one ``error:`` line."""


# --------------------------------------------------------------------------- the model's arm


def inline_toml(value) -> str:
    """``value`` as a TOML literal on one line (inline tables), for a ``--set`` override."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key} = {inline_toml(item)}" for key, item in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(inline_toml(item) for item in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value)  # a TOML basic string


def arm_override(config: Path = MAIN_JOB, arm: str = ARM) -> str:
    """``arms={<arm> = {...}}``: a run of ``config`` with that one arm, as the file defines it.

    The model ``predict`` samples is the main job's MC-dropout arm; its two
    other arms would only make the run three times as long.
    """
    arms = tomllib.loads(config.read_text()).get("arms", {})
    if arm not in arms:
        raise CheckError(f"{config}: no [arms.{arm}]")
    return f"arms={{{arm} = {inline_toml(arms[arm])}}}"


# --------------------------------------------------------------------------- training speed


def phantom_overrides(image_size: int, ngf: int, ndf: int, batch_size: int, shape: list[int]) -> list[str]:
    """``--set`` overrides of the main job: a few phantom subjects of ``shape``, the networks at ``image_size``."""
    return [
        "data.source=phantom",
        f"data.image_size={image_size}",
        f"data.load_size={image_size}",
        "data.phantom.subjects=3",
        f"data.phantom.shape={json.dumps(shape)}",
        f"model.generator.ngf={ngf}",
        f"model.discriminator.ndf={ndf}",
        f"train.batch_size={batch_size}",
    ]


def _timed_steps(trainer, batches: list[dict], steps: int, warmup: int, device) -> float:
    """Seconds for ``steps`` training steps after ``warmup`` untimed ones (cuDNN's autotuning, the allocator)."""
    from benchmarks._bench import synchronize

    for index in range(warmup):
        trainer.step(batches[index % len(batches)])
    synchronize(device)
    started = time.perf_counter()
    for index in range(steps):
        trainer.step(batches[index % len(batches)])
    synchronize(device)
    return time.perf_counter() - started


def training_speed(device, *, image_size: int, ngf: int, ndf: int, batch_size: int, steps: int, warmup: int) -> dict:
    """Steps per second of the main job's MC-dropout arm (generator and PatchGAN updates) in each precision.

    The same networks and batches for both precisions, one after the other,
    each with fresh optimizers (``train.precision`` is autocast; bf16 keeps
    float32 weights). The batches are drawn once and reused, so the figures
    are of the step alone, without data loading; only full batches are
    used (an epoch's short last one would lower the figure).
    """
    from uqsynth.config import load_config
    from uqsynth.pipeline import RunContext, prepare
    from uqsynth.plugins import get_host
    from uqsynth.training import Trainer

    host = get_host()
    overrides = [*phantom_overrides(image_size, ngf, ndf, batch_size, TRAIN_SHAPE), arm_override()]  # one arm built
    config = load_config(MAIN_JOB, host=host, overrides=overrides)
    out = Path(tempfile.mkdtemp(prefix="gpu-check-train-"))
    context = RunContext(config, host, out, device)
    prepare(context)
    models = context.models[ARM]
    trainer = Trainer(config, ARM, models, context.train_set, out, device)
    batches = [batch for batch in trainer.batches(0) if len(batch["source"]) == batch_size]  # full ones only
    if not batches:
        raise CheckError(f"no training batch of {batch_size} slices in the phantom subjects of shape {TRAIN_SHAPE}")
    result = {"arm": ARM, "image_size": image_size, "ngf": ngf, "ndf": ndf, "batch_size": batch_size,
              "steps": steps, "warmup_steps": warmup, "fused_adam": config.train.fused_adam}
    for precision in PRECISIONS:
        config.train.precision = precision
        fresh = Trainer(config, ARM, models, context.train_set, out, device)
        seconds = _timed_steps(fresh, batches, steps, warmup, device)
        result[precision] = {
            "seconds_per_step": seconds / steps,
            "steps_per_s": steps / seconds,
            "slices_per_s": steps * batch_size / seconds,
        }
    result["bf16_speedup"] = result["bf16"]["steps_per_s"] / result["fp32"]["steps_per_s"]
    return result


# --------------------------------------------------------------------------- the report


def _commit() -> dict:
    """The checkout's commit and whether it has uncommitted changes (``None`` outside a git work tree)."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    sha = git("rev-parse", "HEAD")
    status = git("status", "--porcelain") if sha else None
    return {"sha": sha, "dirty": None if status is None else bool(status)}


def device_section(device) -> dict:
    import torch

    from benchmarks._bench import device_name

    section = {"requested": str(device), "type": device.type, "name": device_name(device)}
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        section.update(
            capability=f"{properties.major}.{properties.minor}",
            memory_gib=properties.total_memory / 2**30,
            count=torch.cuda.device_count(),
        )
    return section


def software_section() -> dict:
    import torch

    import uqsynth

    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": cudnn,
        "uqsynth": uqsynth.__version__,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
    }


def sampling_section(path: Path) -> dict:
    """The quick sampling suite's figures per strategy, from its ``--benchmark-json`` file."""
    benchmarks = json.loads(path.read_text())["benchmarks"]
    if not benchmarks:
        raise CheckError(f"{path}: the sampling suite ran no benchmark")
    first = benchmarks[0]["extra_info"]
    section = {key: first[key] for key in ("generator", "image_size", "samples", "slices")}
    section["rounds"] = benchmarks[0]["stats"]["rounds"]
    section["benchmark_json"] = path.name
    section["strategies"] = {
        bench["extra_info"]["strategy"]: {
            **{key: bench["extra_info"][key] for key in SAMPLING_FIELDS if key in bench["extra_info"]},
            "options": bench["extra_info"]["options"],
        }
        for bench in benchmarks
    }
    return section


def predict_section(args: argparse.Namespace, stages: dict[str, float]) -> dict:
    slices, seconds = args.volume_shape[2], stages["predict"]
    return {
        "arm": ARM,
        "volume_shape": args.volume_shape,
        "image_size": args.image_size,
        "samples": args.predict_samples,
        "slices": slices,
        "seconds": seconds,
        "slice_samples_per_s": slices * args.predict_samples / seconds,
        "measure": "wall time of the whole `uqsynth predict` process: start-up, model, NIfTI in and out",
        "phantom_seconds": stages["phantom"],
        "model_run_seconds": stages["run"],
    }


def _stage_seconds(pairs: list[str]) -> dict[str, float]:
    """``NAME=SECONDS`` pairs (the shell script's stage timings) as a dict."""
    try:
        return {name: float(value) for name, value in (pair.split("=", 1) for pair in pairs)}
    except ValueError:
        raise CheckError(f"--stage-seconds: expected NAME=SECONDS pairs, got {pairs}") from None


def report(args: argparse.Namespace) -> dict:
    import torch

    directory = Path(args.dir)
    stages = _stage_seconds(args.stage_seconds)
    return {
        "gpu_check": 1,
        "mode": args.mode,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seconds_total": args.total_seconds,
        "stage_seconds": stages,
        "device": device_section(torch.device(args.device)),
        "software": software_section(),
        "commit": _commit(),
        "sampling": sampling_section(directory / "sampling.json"),
        "predict": predict_section(args, stages),
        "training": json.loads((directory / "training.json").read_text()),
    }


def non_finite(value, where: str = "") -> list[str]:
    """Paths of the numbers in ``value`` (nested dicts and lists) that are NaN or infinite."""
    if isinstance(value, dict):
        return [p for key, item in value.items() for p in non_finite(item, f"{where}.{key}")]
    if isinstance(value, list):
        return [p for index, item in enumerate(value) for p in non_finite(item, f"{where}[{index}]")]
    if isinstance(value, float) and not math.isfinite(value):
        return [where]
    return []


# --------------------------------------------------------------------------- the command line


class _Parser(argparse.ArgumentParser):
    """argparse with the one-line ``error:`` convention of ``uqsynth.cli`` (not imported: it imports torch)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {self.prog}: {message}", file=sys.stderr)
        raise SystemExit(2)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="benchmarks._gpu_check", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    device = commands.add_parser("device", help="resolve --device (auto: CUDA when present) and print it")
    device.add_argument("--device", default="auto")
    commands.add_parser("arm", help=f"print the --set override that keeps the main job's {ARM} arm alone")
    train = commands.add_parser("train", help="training steps per second in fp32 and bf16, as JSON")
    train.add_argument("--device", required=True)
    for name in ("image-size", "ngf", "ndf", "batch-size", "steps", "warmup"):
        train.add_argument(f"--{name}", type=int, required=True)
    train.add_argument("--out", required=True)
    gather = commands.add_parser("report", help="gather every stage's figures into DIR/gpu_check.json")
    gather.add_argument("--dir", required=True)
    gather.add_argument("--mode", choices=("full", "shrink"), required=True)
    gather.add_argument("--device", required=True)
    gather.add_argument("--volume-shape", type=int, nargs=3, required=True)
    gather.add_argument("--image-size", type=int, required=True)
    gather.add_argument("--predict-samples", type=int, required=True)
    gather.add_argument("--stage-seconds", nargs="+", required=True, metavar="NAME=SECONDS")
    gather.add_argument("--total-seconds", type=float, required=True)
    return parser


def _run(args: argparse.Namespace) -> None:
    if args.command == "arm":
        print(arm_override())
        return
    from uqsynth.devices import resolve_device

    if args.command == "device":
        device = resolve_device(args.device, key="--device")
        if importlib.util.find_spec("pytest_benchmark") is None:
            raise CheckError('pytest-benchmark is not installed (the test extra): pip install -e ".[test]"')
        print(device)
    elif args.command == "train":
        device = resolve_device(args.device, key="--device")
        result = training_speed(
            device, image_size=args.image_size, ngf=args.ngf, ndf=args.ndf, batch_size=args.batch_size,
            steps=args.steps, warmup=args.warmup,
        )
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    else:
        result = report(args)
        bad = non_finite(result)
        if bad:
            raise CheckError(f"figures that are not finite numbers: {', '.join(bad)}")
        (Path(args.dir) / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    expected: tuple[type[Exception], ...] = (
        CheckError, OSError, KeyError, json.JSONDecodeError, tomllib.TOMLDecodeError,
    )
    if args.command != "arm":
        from uqsynth.errors import UserError

        expected += (UserError,)
    try:
        _run(args)
    except expected as exc:
        print(f"error: {args.command}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
