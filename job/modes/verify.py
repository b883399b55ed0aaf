"""``verify``: prove every checkpoint of every stage of a run sound (``job.training.audit``), write
verify/report.json and print a table; exit 0 only if every check passes."""

from __future__ import annotations

from dataclasses import asdict

import structlog

from job.config import Config
from job.data.dataset import VideoDataset
from job.exits import EXIT_FAILED, EXIT_OK
from job.modes.common import open_run
from job.monitoring.progress import utc_now
from job.storage import Layout, RunStore
from job.training.audit import Check, RunVerifier
from job.training.stages import STAGES

log = structlog.get_logger("job.verify")


def run(cfg: Config, store: RunStore) -> bool:
    """Check every checkpoint folder of the run, write verify/report.json, print a table.

    ``cfg`` (the command line's) only opens the run: each checkpoint is judged by the config
    saved in it, which is what trained it."""
    datasets: dict[str, VideoDataset] = {}
    verifiers = [RunVerifier(store, stage, datasets) for stage in STAGES]
    log.info("verify.start", checkpoints=sum(len(verifier.names) for verifier in verifiers))
    checks = [check for verifier in verifiers for check in verifier.run()]
    names = [f"{verifier.prefix}{name}" for verifier in verifiers for name in verifier.names]
    failed = [check for check in checks if not check.passed]
    store.write_json(
        Layout.verify_report,
        {"passed": not failed, "checks": [asdict(check) for check in checks], "checkpoints": names, "created_at": utc_now()},
    )
    for check in failed:
        log.warning("verify.check_failed", check=check.name, detail=check.detail)
    log.info(
        "verify.done", passed=not failed, checks=len(checks), failed=len(failed),
        checkpoints=len(names), report=Layout.verify_report,
    )
    print(render_table(checks, f"{store.uri.rstrip('/')}/{Layout.verify_report}"), flush=True)
    return not failed


def render_table(checks: list[Check], report_uri: str) -> str:
    width = max(len("check"), *(len(check.name) for check in checks))
    lines = [f"{'check':<{width}}  result  detail", f"{'-' * width}  ------  {'-' * 6}"]
    lines += [f"{c.name:<{width}}  {'PASS' if c.passed else 'FAIL':<6}  {c.detail}" for c in checks]
    failed = sum(not check.passed for check in checks)
    verdict = f"FAILED ({failed} of {len(checks)} checks)" if failed else f"PASSED (all {len(checks)} checks)"
    lines.append(f"verify {verdict}; report: {report_uri}")
    return "\n".join(lines)


def main(cfg: Config, run_uri: str, cache_dir: str | None) -> int:
    # The run URI is the run's truth: the cache of the host that trained may hold good bytes
    # where the bucket's have rotted, and verify vouches for the bucket.
    return EXIT_OK if open_run(run, cfg, run_uri, cache_dir, proven_reads=True) else EXIT_FAILED
