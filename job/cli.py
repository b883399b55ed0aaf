"""Command line (SPEC §3): ``python -m job MODE [options]``; parsing and exit codes only.

Heavy imports (torch) happen inside the modes, so ``--help`` and usage errors answer fast.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_BAD_DATA = 3
EXIT_TRY_LATER = 75  # stalled, or another writer holds the run: a restart later resumes it
EXIT_PREEMPTED = 143  # 128 + SIGTERM, what a shell reports for a process SIGTERM ended

MODES = {
    "generate": "write the dataset (train also does it when the dataset is missing)",
    "train": "resumable training; resumes automatically when the run already has checkpoints",
    "verify": "check every checkpoint of a run (exit 0 only if all pass); writes verify/report.json",
    "evaluate": "quality report of the run's best checkpoint on the test split; writes eval/",
    "sample": "class-conditional videos from the trained stage 2 (stage2.samples_per_class per class); writes samples/",
    "predict": "the trained stage 2 continues test videos from their first frames; writes predictions/",
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
    for name, help_text in MODES.items():
        modes.add_parser(name, parents=[parent], help=help_text, description=help_text)
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


def positive_seconds(text: str) -> float:
    seconds = float(text)
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, not {text}")
    return seconds


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.mode == "status":
        return run_status(args)

    from job.config import ConfigError, build_config  # after parsing: --help stays instant
    from job.monitoring.logs import setup_logging

    setup_logging(args.log_level, mode=args.mode)
    try:
        cfg = build_config(args.preset, args.config, args.overrides)
    except ConfigError as exc:
        return fail(EXIT_USAGE, "bad configuration", exc)
    run_uri = args.run_uri or os.path.join("runs", args.preset)
    return run_mode(args.mode, lambda: dispatch(args.mode, cfg, run_uri, args.cache_dir))


def run_status(args: argparse.Namespace) -> int:
    """No logging setup: stdout belongs to the report, for a person or a --json reader."""
    uri = args.uri or args.run_uri
    if not uri:
        print("error: status needs RUN_URI (or --run-uri, or env JOB_RUN_URI)", file=sys.stderr)
        return EXIT_USAGE
    from job.status import status_main

    return status_main(uri, args.json, args.watch)


def dispatch(mode: str, cfg, run_uri: str, cache_dir: str | None) -> int:
    """Run one mode on its run folder; returns the exit code of a mode that judges (verify)."""
    from job.distributed import Topology
    from job.monitoring.lifecycle import WAITING_FOR_STORE, sleep_unless_stopped
    from job.storage import RunStore
    from job.data import run_generate
    from job.training.loop import train

    topology = Topology.from_env()  # set by torchrun; one process otherwise
    store = RunStore.for_job(run_uri, cache_dir, cfg.storage, read_only=not topology.is_writer)
    try:
        if mode == "train":
            # Its own preflight also sizes the disk; it flushes its uploads itself, while it holds the lease.
            train(cfg, store, topology)
        else:
            store.preflight(cfg.storage.connect_seconds, sleep=sleep_unless_stopped(WAITING_FOR_STORE))
            if mode == "generate":
                run_generate(cfg, store)
            elif mode == "verify":
                from job.verify import run_verify

                if not run_verify(cfg, store):
                    return EXIT_FAILED
            elif mode == "evaluate":
                from job.evaluate import run_evaluate

                run_evaluate(cfg, store)
            elif mode == "sample":
                from job.sampling import run_sample

                run_sample(cfg, store)
            elif mode == "predict":
                from job.sampling import run_predict

                run_predict(cfg, store)
            store.flush(cfg.storage.flush_seconds)
    finally:
        store.close()
    return EXIT_OK


def run_mode(mode: str, body: Callable[[], int]) -> int:
    """Run a mode and turn its failure into the exit code SPEC §3 promises. SIGTERM and SIGINT
    are requests to stop at the next safe point from here on (``StopRequest``)."""
    from job.config import ConfigError
    from job.data import DataError
    from job.fsutil import DiskFull
    from job.monitoring.lifecycle import Stopped, StopRequest
    from job.storage.lease import LeaseBusy, LeaseError
    from job.checkpointer import Diverged
    from job.storage import StoreRefused

    try:
        with StopRequest():
            return body()
    except Stopped as exc:  # the training loop's Preempted too
        return fail(EXIT_PREEMPTED, "preempted", exc)
    except LeaseBusy as exc:
        return fail(EXIT_TRY_LATER, "another writer holds the run", exc)
    except LeaseError as exc:
        return fail(EXIT_TRY_LATER, "this process may not write the run", exc)
    except ConfigError as exc:
        return fail(EXIT_USAGE, "refused", exc)
    except StoreRefused as exc:  # wrong credentials, access denied, no such bucket: no restart helps
        return fail(EXIT_USAGE, "store refused", exc)
    except DataError as exc:
        return fail(EXIT_BAD_DATA, "bad input data", exc)
    except DiskFull as exc:  # the message names the path and the space; a traceback adds nothing
        return fail(EXIT_FAILED, "disk full", exc)
    except Diverged as exc:  # the message says where and what to change; a traceback adds nothing
        return fail(EXIT_FAILED, "diverged", exc)
    except KeyboardInterrupt as exc:
        return fail(EXIT_FAILED, "interrupted", exc)
    except Exception as exc:
        return fail(EXIT_FAILED, f"{mode} failed", exc, with_traceback=True)


def fail(code: int, what: str, exc: BaseException, with_traceback: bool = False) -> int:
    import structlog

    from job.monitoring.logs import redact_environment_secrets

    log = structlog.get_logger("job.cli")
    if with_traceback:
        log.error(what, error=str(exc), exit_code=code, exc_info=exc)
    else:
        log.error(what, error=str(exc), exit_code=code)
    print(f"error: {redact_environment_secrets(str(exc))}", file=sys.stderr, flush=True)
    return code
