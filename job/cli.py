"""The command line: ``python -m job MODE [options]`` (README.md, "Command line"). Parses, dispatches
through the table of modes, and turns a failure into its exit code (``job.exits``).

A mode's module is imported only once its arguments parse, so ``--help`` and usage errors answer
without loading torch, and ``status`` never loads it.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import structlog

from job.config import ConfigError, build_config
from job.exits import EXIT_FAILED, EXIT_USAGE
from job.monitoring.logs import redact_environment_secrets, setup_logging
from job.runtime.signals import StopRequest


@dataclass(frozen=True)
class Mode:
    help: str
    module: str  # job.modes.<name>: its ``main`` runs the mode and returns its exit code


MODES = {
    "generate": Mode("write the dataset (train also does it when the dataset is missing)", "job.modes.generate"),
    "train": Mode("resumable training; resumes automatically when the run already has checkpoints", "job.modes.train"),
    "verify": Mode("check every checkpoint of a run (exit 0 only if all pass); writes verify/report.json",
                   "job.modes.verify"),
    "evaluate": Mode("quality report of the run's best checkpoint on the test split; writes eval/", "job.modes.evaluate"),
    "sample": Mode("class-conditional videos from the trained stage 2 (stage2.samples_per_class per class); "
                   "writes samples/", "job.modes.sample"),
    "predict": Mode("the trained stage 2 continues test videos from their first frames; writes predictions/",
                    "job.modes.predict"),
}
# status takes its own arguments (RUN_URI first, no config): it runs on a laptop without torch.
STATUS_HELP = "read only the run folder and print where the run stands (exit 0 healthy, 1 not, 2 no such run)"


def common_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--run-uri", default=os.environ.get("JOB_RUN_URI"),
        help="run folder: a local path or s3://bucket/prefix (env JOB_RUN_URI; default ./runs/<preset>)",
    )
    parent.add_argument(
        "--preset", default=os.environ.get("JOB_PRESET", "default"),
        help="smoke | small | default (env JOB_PRESET; default: default)",
    )
    parent.add_argument("--config", metavar="FILE", help="JSON or TOML file of config sections, applied after the preset")
    parent.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one dotted config key, e.g. --set train.epochs=3 (repeatable; applied last)",
    )
    parent.add_argument(
        "--cache-dir", default=os.environ.get("JOB_CACHE_DIR"),
        help="local working copy of a remote run (env JOB_CACHE_DIR)",
    )
    parent.add_argument(
        "--log-level", default=os.environ.get("JOB_LOG_LEVEL", "INFO"),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"], type=str.upper,
        help="env JOB_LOG_LEVEL; default INFO",
    )
    return parent


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m job", description="MAGVIT-style video tokenizer training job")
    modes = parser.add_subparsers(dest="mode", metavar="MODE", required=True)
    parent = common_options()
    for name, mode in MODES.items():
        modes.add_parser(name, parents=[parent], help=mode.help, description=mode.help)
    add_status_mode(modes)
    return parser


def add_status_mode(modes: argparse._SubParsersAction) -> None:
    status = modes.add_parser("status", help=STATUS_HELP, description=STATUS_HELP)
    status.add_argument("uri", nargs="?", metavar="RUN_URI", help="the run folder: a local path or s3://bucket/prefix")
    status.add_argument(
        "--run-uri", default=os.environ.get("JOB_RUN_URI"),
        help="the same, when RUN_URI is not given (env JOB_RUN_URI)",
    )
    status.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    status.add_argument(
        "--watch", type=positive_seconds, metavar="SECONDS",
        help="print again every SECONDS until the run completes, fails or stalls (Ctrl-C ends it)",
    )
    status.add_argument("--html", metavar="PATH", help="also write the run page (index.html's content) to PATH")
    status.add_argument("--open", action="store_true", help="open the page written by --html in the default browser")


def positive_seconds(text: str) -> float:
    seconds = float(text)
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, not {text}")
    return seconds


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.mode == "status":
        return run_status(args)

    setup_logging(args.log_level, mode=args.mode)
    try:
        cfg = build_config(args.preset, args.config, args.overrides)
    except ConfigError as exc:
        return fail(EXIT_USAGE, "bad configuration", exc)
    run_uri = args.run_uri or os.path.join("runs", args.preset)
    mode = importlib.import_module(MODES[args.mode].module)
    return run_mode(args.mode, lambda: mode.main(cfg, run_uri, args.cache_dir))


def run_status(args: argparse.Namespace) -> int:
    """No logging setup: stdout belongs to the report, for a person or a --json reader."""
    uri = args.uri or args.run_uri
    if not uri:
        print("error: status needs RUN_URI (or --run-uri, or env JOB_RUN_URI)", file=sys.stderr)
        return EXIT_USAGE
    if args.open and not args.html:
        print("error: --open opens the page that --html PATH writes: give --html PATH too", file=sys.stderr)
        return EXIT_USAGE
    status = importlib.import_module("job.modes.status")
    return status.main(uri, args.json, args.watch, html=args.html, open_page=args.open)


def run_mode(mode: str, body: Callable[[], int]) -> int:
    """Run a mode and turn its failure into the exit code the contract promises. SIGTERM and
    SIGINT are requests to stop at the next safe point from here on (``StopRequest``). An
    exception with an ``exit_code`` of its own carries a message that says what to do, so it is
    logged without a traceback; anything else is a bug or an outage, logged with one."""
    try:
        with StopRequest():
            return body()
    except KeyboardInterrupt as exc:
        return fail(EXIT_FAILED, "interrupted", exc)
    except BaseException as exc:
        code = getattr(exc, "exit_code", None)
        if isinstance(code, int):
            return fail(code, exc.summary, exc)
        if not isinstance(exc, Exception):
            raise  # SystemExit and the like are not failures of the mode
        return fail(EXIT_FAILED, f"{mode} failed", exc, with_traceback=True)


def fail(code: int, what: str, exc: BaseException, with_traceback: bool = False) -> int:
    log = structlog.get_logger("job.cli")
    if with_traceback:
        log.error(what, error=str(exc), exit_code=code, exc_info=exc)
    else:
        log.error(what, error=str(exc), exit_code=code)
    print(f"error: {redact_environment_secrets(str(exc))}", file=sys.stderr, flush=True)
    return code
