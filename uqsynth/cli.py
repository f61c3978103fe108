"""The ``uqsynth`` command line.

User errors (a missing file, bad TOML, an unknown plugin, a bad value) print
one ``error: ...`` line and exit with status 2; ``--debug`` adds the
traceback. Stages that do not exist yet say so and exit with status 3.
Anything else is a bug: status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Sequence

import uqsynth
from uqsynth.errors import StageNotImplemented, UserError

EXIT_USER_ERROR = 2
EXIT_NOT_IMPLEMENTED = 3


class _Parser(argparse.ArgumentParser):
    """argparse with uqsynth's one-line ``error:`` convention."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {self.prog}: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="uqsynth", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    # Subcommands accept --debug too; SUPPRESS keeps them from resetting `uqsynth --debug run ...`.
    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks for errors")

    parser.add_argument("--version", action="version", version=f"uqsynth {uqsynth.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = commands.add_parser("run", parents=[common], help="train, sample, calibrate, certify, evaluate and report")
    run.add_argument("config", help="TOML configuration, e.g. plugins/bcgan_t1t2.toml")
    run.add_argument("--out", help="run directory (default: runs/<run.name>)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a configuration key, value as a TOML literal (repeatable)")
    run.add_argument("--device", help="auto, cpu or cuda[:i] (overrides run.device)")
    run.add_argument("--smoke", action="store_true", help="the same pipeline at a tiny size, to check the wiring")
    run.add_argument("--force", action="store_true",
                     help="replace a run of another configuration in --out (default: refuse it)")
    run.set_defaults(func=_cmd_run)

    report = commands.add_parser("report", parents=[common], help="rebuild metrics and report from a run's predictions")
    report.add_argument("run", help="a run directory written by `uqsynth run`")
    report.set_defaults(func=_cmd_report)

    predict = commands.add_parser("predict", parents=[common], help="posterior mean, std and interval maps as NIfTI")
    predict.add_argument("--model", required=True, help="a trained arm, RUN/<arm>")
    predict.add_argument("--input", dest="inputs", action="append", required=True, metavar="PATH",
                         help="a NIfTI file, a quoted glob, a flat folder, a BIDS dataset or a folder of BraTS "
                              "subjects (repeatable)")
    predict.add_argument("--out", required=True,
                         help="directory for <id>_desc-{mean,std,...}_T2w.nii.gz and <id>_uncertainty.json")
    predict.add_argument("--layout", choices=("flat", "bids"), default="flat",
                         help="flat: files side by side (default); bids: a BIDS-derivatives tree")
    predict.add_argument("--samples", type=int, help="T (default: the run's sampling.samples)")
    predict.add_argument("--level", type=float, default=0.95, help="central interval level (default 0.95)")
    predict.add_argument("--device", help="auto, cpu or cuda[:i] (default: the run's)")
    predict.add_argument("--rescale-like", metavar="REF", help="map [0, 1] to a reference T2w's intensity range")
    predict.add_argument("--calibrator", help="fitted calibrator for the interval (default: the run's first)")
    predict.set_defaults(func=_cmd_predict)

    phantom = commands.add_parser("phantom", parents=[common], help="write phantom subjects as NIfTI (BraTS 2023 naming)")
    phantom.add_argument("--out", required=True, help="directory to write subject folders into")
    phantom.add_argument("--subjects", type=int, required=True, help="number of subjects")
    phantom.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    phantom.add_argument("--orientation", choices=("RAS", "LPS"), default="RAS", help="array orientation on disk")
    phantom.set_defaults(func=_cmd_phantom)

    plugins = commands.add_parser("plugins", parents=[common], help="list registered plugins")
    plugins.add_argument("--json", action="store_true", help="machine-readable output")
    plugins.set_defaults(func=_cmd_plugins)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except UserError as exc:
        if args.debug:
            traceback.print_exc()
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank raises it; one says it
            print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except StageNotImplemented as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_NOT_IMPLEMENTED
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            traceback.print_exc()
        print(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


def _cmd_plugins(args: argparse.Namespace) -> int:
    from uqsynth.plugins import KINDS, get_host

    host = get_host()
    for broken in host.broken:
        print(f"warning: {broken.message}", file=sys.stderr)
    if args.json:
        listing = {kind: [entry.as_dict() for entry in sorted(host[kind], key=lambda e: e.name)] for kind in KINDS}
        print(json.dumps(listing, indent=2))
        return 0
    for kind in KINDS:
        print(f"{kind}:")
        entries = sorted(host[kind], key=lambda e: e.name)
        if not entries:
            print("  (none)")
        for entry in entries:
            origin = entry.plugin.name if entry.plugin.distribution == "uqsynth" else (
                f"{entry.plugin.name} ({entry.plugin.distribution} {entry.plugin.version})"
            )
            print(f"  {entry.name:<26} {origin:<40} {entry.summary}")
    if host.broken:
        print("broken plugins:")
        for broken in host.broken:
            plugin = broken.plugin
            print(f"  {plugin.name} ({plugin.distribution} {plugin.version}): BROKEN: {broken.message}")
    return 0


def _cmd_phantom(args: argparse.Namespace) -> int:
    from pathlib import Path

    from uqsynth.data.phantom import write_subjects
    from uqsynth.errors import ConfigError

    if args.subjects < 1:
        raise ConfigError(f"--subjects must be at least 1, found {args.subjects}")
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--out {out}: cannot create the directory: {exc.strerror or exc}") from None
    for directory in write_subjects(out, args.subjects, seed=args.seed, orientation=args.orientation):
        print(directory)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from uqsynth.pipeline import run_report

    return run_report(args.run)


def _cmd_predict(args: argparse.Namespace) -> int:
    from uqsynth.predict import run_predict

    return run_predict(
        model=args.model, inputs=args.inputs, out=args.out, samples=args.samples, level=args.level,
        device=args.device, rescale_like=args.rescale_like, calibrator=args.calibrator, layout=args.layout,
    )


def _cmd_run(args: argparse.Namespace) -> int:
    from uqsynth.pipeline import run_pipeline

    return run_pipeline(
        args.config, out=args.out, overrides=args.overrides, device=args.device, smoke=args.smoke, force=args.force
    )


if __name__ == "__main__":
    sys.exit(main())
