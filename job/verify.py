"""``verify`` (SPEC §11): prove every checkpoint of a run sound, one named check at a time.

For each checkpoint folder, oldest first:

- ``manifest``: manifest.json exists and every file it lists has its size and sha256;
- ``safe_load``: the files parse with the safe loaders (safetensors, JSON) and the folder holds
  nothing else (a planted pickle is never loaded by the job, but it does not belong there);
- ``forward``: the model rebuilt from the checkpoint's own config encodes and decodes a
  validation batch to integer codes in range and a finite video of the input's shape;
- ``cadence``: folder name, manifest and state.json agree on step and epoch, the position fits
  the epoch arithmetic, the recorded reason fits the checkpoint settings, and steps increase;
- ``weights_changed``: the weights differ from the previous checkpoint's (the oldest one's
  from the initial weights);
- ``metrics_history``: the saved history holds every finished epoch once, in order.

And for the run: ``metrics_history metrics.jsonl``, ``latest`` (latest.json names a sound
checkpoint with its step) and ``checkpoints`` (at least one sound committed checkpoint).

A folder without a manifest that is newer than every committed checkpoint is an interrupted
save, which readers skip and the next attempt replaces: it is reported, not failed. One older
than a committed checkpoint should not exist (pruning removes such leftovers), so it fails
``manifest``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import structlog
import torch

from job.checkpoint import MANIFEST_FILE, Checkpoint, CheckpointReader, ManifestMismatch, UnreadableCheckpoint
from job.config import Config, config_from_dict, split_sizes, steps_per_epoch
from job.data import VideoDataset, prepare_dataset
from job.model import trained_tokenizer
from job.monitoring.progress import utc_now
from job.storage import Layout, RunStore
from job.training.task import initial_tokenizer

log = structlog.get_logger("job.verify")

SAFE_SUFFIXES = (".safetensors", ".json")


@dataclass
class Check:
    name: str
    passed: bool
    detail: str


class CheckFailed(Exception):
    """A check found a fault; the message is the detail a person reads."""


def run_verify(cfg: Config, store: RunStore) -> bool:
    """Check every checkpoint folder of the run, write verify/report.json, print a table.

    ``cfg`` (the command line's) only opens the run: each checkpoint is judged by the config
    saved in it, which is what trained it."""
    verifier = RunVerifier(store, CheckpointReader(store))
    checks = verifier.run()
    failed = [check for check in checks if not check.passed]
    store.write_json(
        Layout.verify_report,
        {
            "passed": not failed,
            "checks": [asdict(check) for check in checks],
            "checkpoints": verifier.names,
            "created_at": utc_now(),
        },
    )
    for check in failed:
        log.warning("verify.check_failed", check=check.name, detail=check.detail)
    log.info(
        "verify.done", passed=not failed, checks=len(checks), failed=len(failed),
        checkpoints=len(verifier.names), report=Layout.verify_report,
    )
    print(render_table(checks, f"{store.uri.rstrip('/')}/{Layout.verify_report}"), flush=True)
    return not failed


class RunVerifier:
    """Runs the checks over one run folder and collects their results in order."""

    def __init__(self, store: RunStore, checkpointer: CheckpointReader):
        self.store = store
        self.checkpointer = checkpointer
        self.names = checkpointer.names()
        self.checks: list[Check] = []
        self.sound_steps: dict[str, int] = {}  # committed checkpoints that loaded, by name
        self.datasets: dict[str, VideoDataset] = {}  # by data config: prepared once per run

    def run(self) -> list[Check]:
        if not self.names:
            where = f"{self.store.uri.rstrip('/')}/{Layout.checkpoints}"
            self.add("checkpoints", False, f"no checkpoint folder under {where}: nothing to verify (wrong --run-uri?)")
            return self.checks
        committed = self.checkpointer.committed()
        previous: Checkpoint | None = None
        for name in self.names:
            if name not in committed:
                self.check_uncommitted(name, committed[-1] if committed else None)
                continue
            checkpoint = self.load(name)
            if checkpoint is not None:
                self.check_checkpoint(checkpoint, previous)
                self.sound_steps[name] = checkpoint.state["step"]
                previous = checkpoint
        self.record(f"metrics_history {Layout.metrics}", lambda: self.metrics_file(previous))
        self.record("latest", self.latest)
        self.record("checkpoints", lambda: self.summary(committed))
        return self.checks

    # --- bookkeeping ---------------------------------------------------------------------

    def add(self, name: str, passed: bool, detail: str) -> None:
        self.checks.append(Check(name, passed, detail))

    def record(self, name: str, check: Callable[[], str]) -> None:
        """Run one check; its return value is the detail of a pass."""
        try:
            self.add(name, True, check())
        except CheckFailed as exc:
            self.add(name, False, str(exc))
        except Exception as exc:  # a verifier reports what broke and goes on to the next check
            self.add(name, False, f"{type(exc).__name__}: {exc}")

    # --- per checkpoint ------------------------------------------------------------------

    def check_uncommitted(self, name: str, newest_committed: str | None) -> None:
        if newest_committed is None or name > newest_committed:
            self.add(
                f"manifest {name}", True,
                "not committed (no manifest.json): an interrupted save; readers skip it, the next attempt replaces it",
            )
        else:
            self.add(
                f"manifest {name}", False,
                f"no manifest.json, yet the newer {newest_committed} is committed: a lost manifest "
                "(or an interrupted prune); readers skip this folder",
            )

    def load(self, name: str) -> Checkpoint | None:
        """CheckpointReader.load, split into the two checks it covers."""
        try:
            checkpoint = self.checkpointer.load(name)
        except ManifestMismatch as exc:
            self.add(f"manifest {name}", False, str(exc))
            return None
        except UnreadableCheckpoint as exc:
            self.add(f"manifest {name}", True, "every listed file has its size and sha256")
            self.add(f"safe_load {name}", False, str(exc))
            return None
        files = checkpoint.manifest["files"]
        self.add(f"manifest {name}", True, f"{len(files)} files, each with its size and sha256")
        return checkpoint

    def check_checkpoint(self, checkpoint: Checkpoint, previous: Checkpoint | None) -> None:
        name = checkpoint.name
        self.record(f"safe_load {name}", lambda: self.safe_files(checkpoint))
        self.record(f"forward {name}", lambda: self.forward(checkpoint))
        self.record(f"cadence {name}", lambda: cadence(checkpoint, previous))
        self.record(f"weights_changed {name}", lambda: weights_changed(checkpoint, previous))
        self.record(f"metrics_history {name}", lambda: saved_history(checkpoint))

    def safe_files(self, checkpoint: Checkpoint) -> str:
        listed = set(checkpoint.manifest["files"])
        present = set(self.store.list_dir(Layout.checkpoint_dir(checkpoint.name))) - {MANIFEST_FILE}
        problems = [f"{f}: in the folder but not in the manifest" for f in sorted(present - listed)]
        problems += [f"{f}: neither safetensors nor JSON" for f in sorted(listed) if not f.endswith(SAFE_SUFFIXES)]
        if problems:
            raise CheckFailed("; ".join(problems))
        tensors = len(checkpoint.model) + len(checkpoint.optimizer) + len(checkpoint.rng)
        return f"{tensors} tensors read with safetensors, state with JSON; no other file"

    def forward(self, checkpoint: Checkpoint) -> str:
        cfg = config_from_dict(checkpoint.state["config"])
        model = trained_tokenizer(checkpoint.model, cfg.model, cfg.data)
        videos = self.validation_batch(cfg)
        codes = model.encode(videos)
        recon = model.decode(codes)
        expected_codes = (len(videos), *model.latent_shape())
        if codes.is_floating_point() or codes.dtype == torch.bool or tuple(codes.shape) != expected_codes:
            raise CheckFailed(f"codes {codes.dtype}{tuple(codes.shape)}, expected integers of shape {expected_codes}")
        if int(codes.min()) < 0 or int(codes.max()) >= model.codebook_size:
            span = f"{int(codes.min())}..{int(codes.max())}"
            raise CheckFailed(f"codes span {span}, outside 0..{model.codebook_size - 1}")
        if recon.shape != videos.shape:
            raise CheckFailed(f"reconstruction {tuple(recon.shape)}, input {tuple(videos.shape)}")
        if not torch.isfinite(recon).all():
            raise CheckFailed("the reconstruction holds NaN or infinite values")
        mse = float(torch.mean((recon - videos) ** 2))
        return f"{len(videos)} validation videos -> codes {expected_codes} in range -> finite video; MSE {mse:.5f}"

    def validation_batch(self, cfg: Config) -> torch.Tensor:
        key = json.dumps(cfg.to_dict()["data"], sort_keys=True)
        if key not in self.datasets:
            self.datasets[key] = prepare_dataset(cfg, self.store)
        dataset = self.datasets[key]
        videos, _ = dataset.get(dataset.split("val")[: cfg.train.batch_size])
        return videos

    # --- per run -------------------------------------------------------------------------

    def metrics_file(self, newest: Checkpoint | None) -> str:
        """metrics.jsonl is rewritten from the checkpoint history on every resume, so it holds
        each epoch once; it may run ahead of the newest checkpoint, never behind it."""
        records = read_jsonl(self.store.read_bytes(Layout.metrics) or b"")
        saved = newest.state["epoch"] if newest else 0
        last = max([saved, *[r.get("epoch") for r in records if isinstance(r.get("epoch"), int)]])
        problem = history_problem(records, last)
        if problem:
            raise CheckFailed(f"{Layout.metrics}: {problem}")
        held = f"epochs 1..{last}, each once and in order" if last else "no epoch finished yet"
        return f"{held} ({f'{newest.name} saved {saved}' if newest else 'no sound checkpoint to compare with'})"

    def latest(self) -> str:
        latest = self.store.read_json(Layout.latest)
        if not isinstance(latest, dict):
            raise CheckFailed(f"{Layout.latest} is missing or not JSON")
        name, step = latest.get("checkpoint"), latest.get("step")
        if name not in self.sound_steps:
            raise CheckFailed(f"points to {name!r}, which is not a sound committed checkpoint")
        if self.sound_steps[name] != step:
            raise CheckFailed(f"says step {step}, but {name} holds step {self.sound_steps[name]}")
        newest = max(self.sound_steps)
        # latest.json is written after the manifest: a kill between the two leaves it one behind.
        lag = "" if name == newest else f" ({newest} is newer: latest.json lags after an interrupted commit)"
        return f"{name}, step {step}{lag}"

    def summary(self, committed: list[str]) -> str:
        faulty = len(committed) - len(self.sound_steps)
        uncommitted = len(self.names) - len(committed)
        parts = [f"{len(self.sound_steps)} sound"]
        parts += [f"{faulty} committed but faulty"] if faulty else []
        parts += [f"{uncommitted} not committed"] if uncommitted else []
        counts = f"{len(self.names)} checkpoint folder(s): {', '.join(parts)}"
        if not self.sound_steps:
            raise CheckFailed(f"no sound committed checkpoint; {counts}")
        return counts


# --- checks that need nothing but the checkpoints ------------------------------------------


def cadence(checkpoint: Checkpoint, previous: Checkpoint | None) -> str:
    state, manifest = checkpoint.state, checkpoint.manifest
    step, epoch = state["step"], state["epoch"]
    cfg = config_from_dict(state["config"])
    problems = []
    if checkpoint.name != Layout.checkpoint_name(step):
        problems.append(f"the folder's name does not match state.json's step {step}")
    if (manifest.get("step"), manifest.get("epoch")) != (step, epoch):
        problems.append(f"manifest says step {manifest.get('step')} epoch {manifest.get('epoch')}, "
                        f"state.json step {step} epoch {epoch}")
    if previous is not None and step <= previous.state["step"]:
        problems.append(f"step {step} goes backwards: {previous.name} holds step {previous.state['step']}")
    if previous is not None and epoch < previous.state["epoch"]:
        problems.append(f"epoch {epoch} goes backwards: {previous.name} holds epoch {previous.state['epoch']}")
    problems += position_problems(state, cfg)
    problems += reason_problems(state, cfg)
    if problems:
        raise CheckFailed("; ".join(problems))
    return f"step {step}, epoch {epoch}, {state['sample_in_epoch']} samples into the next; reason {state['reason']!r}"


def position_problems(state: dict[str, Any], cfg: Config) -> list[str]:
    """Every step trains one batch of the epoch's order, so step, epoch and the position inside
    the epoch determine each other."""
    step, epoch, sample = state["step"], state["epoch"], state["sample_in_epoch"]
    n_train, batch_size = split_sizes(cfg.data)[0], cfg.train.batch_size
    if not 0 <= sample <= n_train:
        return [f"sample_in_epoch {sample} outside 0..{n_train}"]
    expected = epoch * steps_per_epoch(cfg) + math.ceil(sample / batch_size)
    problems = []
    if step != expected:
        problems.append(f"step {step}, but epoch {epoch} plus {sample} samples at batch size {batch_size} "
                        f"make step {expected}")
    total = steps_per_epoch(cfg) * cfg.train.epochs
    if step > total:
        problems.append(f"step {step} beyond the run's {total} steps")
    return problems


def reason_problems(state: dict[str, Any], cfg: Config) -> list[str]:
    """Whether the recorded reason could have triggered this checkpoint, under the checkpoint
    settings of the attempt that wrote it (they may change between attempts)."""
    step, epoch, sample, reason = state["step"], state["epoch"], state["sample_in_epoch"], state.get("reason")
    c = cfg.checkpoint
    total = steps_per_epoch(cfg) * cfg.train.epochs
    allowed = {
        "epochs": (c.every_epochs > 0 and epoch > 0 and sample == 0 and epoch % c.every_epochs == 0,
                   f"the end of an epoch that is a multiple of checkpoint.every_epochs={c.every_epochs}"),
        "steps": (c.every_steps > 0 and step % c.every_steps == 0,
                  f"a step that is a multiple of checkpoint.every_steps={c.every_steps}"),
        "minutes": (c.every_minutes > 0, "checkpoint.every_minutes > 0"),
        "signal": (True, ""),
        "final": (step == total and sample == 0, f"the last step, {total} for train.epochs={cfg.train.epochs}"),
    }
    if reason not in allowed:
        return [f"unknown reason {reason!r}"]
    fits, needs = allowed[reason]
    return [] if fits else [f"reason {reason!r} needs {needs}"]


def weights_changed(checkpoint: Checkpoint, previous: Checkpoint | None) -> str:
    if previous is None:
        cfg = config_from_dict(checkpoint.state["config"])
        reference = initial_tokenizer(cfg).state_dict()
        label = f"the initial weights (seed {cfg.seed})"
    else:
        reference, label = previous.model, previous.name
    changed = sum(
        1 for key, tensor in checkpoint.model.items() if key not in reference or not torch.equal(tensor, reference[key])
    )
    if not changed:
        raise CheckFailed(f"every weight equals {label}'s")
    return f"{changed} of {len(checkpoint.model)} tensors differ from {label}"


def saved_history(checkpoint: Checkpoint) -> str:
    state = checkpoint.state
    metrics = state.get("metrics")
    if not isinstance(metrics, list):
        raise CheckFailed("state.json has no metrics list")
    problem = history_problem(metrics, state["epoch"])
    if problem:
        raise CheckFailed(f"state.json metrics: {problem}")
    return f"epochs 1..{state['epoch']}, each once and in order" if state["epoch"] else "no epoch finished yet"


def history_problem(records: list[Any], last: int) -> str | None:
    """What is wrong with an epoch history that should read 1, 2, ..., last; None if nothing."""
    records = [record if isinstance(record, dict) else {} for record in records]
    problems = epoch_sequence_problems([record.get("epoch") for record in records], last)
    # train records whether each epoch saw every training sample exactly once, across resumes.
    partial = [str(record.get("epoch")) for record in records if record.get("samples_complete") is False]
    problems += [f"epoch {', '.join(partial)} did not train on every sample exactly once"] if partial else []
    return "; ".join(problems) or None


def epoch_sequence_problems(epochs: list[Any], last: int) -> list[str]:
    expected = list(range(1, last + 1))
    if epochs == expected:
        return []
    missing = sorted(set(expected) - set(epochs))
    repeated = sorted({e for e in epochs if epochs.count(e) > 1}, key=str)
    unexpected = sorted({e for e in epochs if e not in expected}, key=str)
    problems = [f"epoch {', '.join(map(str, missing))} missing"] if missing else []
    problems += [f"epoch {', '.join(map(str, repeated))} repeated"] if repeated else []
    problems += [f"unexpected epoch {', '.join(map(str, unexpected))}"] if unexpected else []
    return [f"{'; '.join(problems or ['epochs out of order'])} (expected 1..{last})"]


def read_jsonl(data: bytes) -> list[dict[str, Any]]:
    records = []
    for number, line in enumerate(data.decode().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise CheckFailed(f"line {number} is not JSON: {exc}") from exc
        records.append(record if isinstance(record, dict) else {})
    return records


def render_table(checks: list[Check], report_uri: str) -> str:
    width = max(len("check"), *(len(check.name) for check in checks))
    lines = [f"{'check':<{width}}  result  detail", f"{'-' * width}  ------  {'-' * 6}"]
    lines += [f"{c.name:<{width}}  {'PASS' if c.passed else 'FAIL':<6}  {c.detail}" for c in checks]
    failed = sum(not check.passed for check in checks)
    verdict = f"FAILED ({failed} of {len(checks)} checks)" if failed else f"PASSED (all {len(checks)} checks)"
    lines.append(f"verify {verdict}; report: {report_uri}")
    return "\n".join(lines)
