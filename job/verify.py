"""``verify`` (SPEC §11): prove every checkpoint of a run sound, one named check at a time.

For each checkpoint folder, oldest first:

- ``manifest``: manifest.json exists and every file it lists has its size and sha256;
- ``safe_load``: the files parse with the safe loaders (safetensors, JSON) and the folder holds
  nothing else (a planted pickle is never loaded by the job, but it does not belong there);
- ``forward``: the model rebuilt from the checkpoint's own config encodes and decodes a
  validation batch to integer codes in range and a finite video of the input's shape;
- ``cadence``: folder name, manifest and state.safetensors agree on step and epoch, the position fits
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

from job.checkpoint import MANIFEST_FILE, MODEL_FILE, Checkpoint, CheckpointReader, ManifestMismatch, UnreadableCheckpoint
from job.config import Config, config_from_dict, split_sizes
from job.data import VideoDataset, prepare_dataset
from job.model import VideoTokenizer, trained_tokenizer
from job.monitoring.lifecycle import stop_point
from job.monitoring.progress import utc_now
from job.storage import Layout, RunStore
from job.training.stage2 import build_transformer, trained_transformer
from job.transformer import masked_token_loss
from job.training.stages import StagePlan, stage_plans
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
    datasets: dict[str, VideoDataset] = {}
    verifiers = [RunVerifier(store, stage, datasets) for stage in (1, 2)]
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


class RunVerifier:
    """Runs the checks over the checkpoints of one stage of a run folder (1: the tokenizer, 2: the
    transformer) and collects their results in order."""

    def __init__(self, store: RunStore, stage: int, datasets: dict[str, VideoDataset]):
        self.store = store
        self.stage = stage
        self.layout = Layout.tokenizer if stage == 1 else Layout.transformer
        self.prefix = self.layout.label  # in check names
        self.checkpointer = CheckpointReader(store, self.layout)
        self.names = self.checkpointer.names()
        self.checks: list[Check] = []
        self.sound_steps: dict[str, int] = {}  # committed checkpoints that loaded, by name
        self.datasets = datasets  # by data config: prepared once per run
        self.tokenizers: dict[str, VideoTokenizer] = {}  # stage 2's, by checkpoint name

    def run(self) -> list[Check]:
        where = f"{self.store.uri.rstrip('/')}/{self.layout.checkpoints}"
        if not self.names and self.stage == 2:
            self.add("checkpoints stage2", True, f"no checkpoint folder under {where}: stage 2 has not started")
            return self.checks
        if not self.names:
            self.add("checkpoints", False, f"no checkpoint folder under {where}: nothing to verify (wrong --run-uri?)")
            return self.checks
        committed = self.checkpointer.committed()
        previous: Checkpoint | None = None
        for name in self.names:
            stop_point("verifying checkpoints")  # the report is written only once every check has run
            if name not in committed:
                self.check_uncommitted(name, committed[-1] if committed else None)
                continue
            checkpoint = self.load(name)
            if checkpoint is not None:
                self.check_checkpoint(checkpoint, previous)
                self.sound_steps[name] = checkpoint.state["step"]
                previous = checkpoint
        self.record(f"metrics_history {self.layout.metrics}", lambda: self.metrics_file(previous))
        self.record(f"latest{' stage2' if self.stage == 2 else ''}", self.latest)
        self.record(f"checkpoints{' stage2' if self.stage == 2 else ''}", lambda: self.summary(committed))
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
                f"manifest {self.prefix}{name}", True,
                "not committed (no manifest.json): an interrupted save; readers skip it, the next attempt replaces it",
            )
        else:
            self.add(
                f"manifest {self.prefix}{name}", False,
                f"no manifest.json, yet the newer {newest_committed} is committed: a lost manifest "
                "(or an interrupted prune); readers skip this folder",
            )

    def load(self, name: str) -> Checkpoint | None:
        """CheckpointReader.load, split into the two checks it covers."""
        try:
            checkpoint = self.checkpointer.load(name)
        except ManifestMismatch as exc:
            self.add(f"manifest {self.prefix}{name}", False, str(exc))
            return None
        except UnreadableCheckpoint as exc:
            self.add(f"manifest {self.prefix}{name}", True, "every listed file has its size and sha256")
            self.add(f"safe_load {self.prefix}{name}", False, str(exc))
            return None
        files = checkpoint.manifest["files"]
        self.add(f"manifest {self.prefix}{name}", True, f"{len(files)} files, each with its size and sha256")
        return checkpoint

    def check_checkpoint(self, checkpoint: Checkpoint, previous: Checkpoint | None) -> None:
        name = checkpoint.name
        self.record(f"safe_load {self.prefix}{name}", lambda: self.safe_files(checkpoint))
        forward = self.forward if self.stage == 1 else self.forward_transformer
        self.record(f"forward {self.prefix}{name}", lambda: forward(checkpoint))
        self.record(f"cadence {self.prefix}{name}", lambda: cadence(checkpoint, previous, self.stage))
        self.record(f"weights_changed {self.prefix}{name}", lambda: weights_changed(checkpoint, previous, self.initial_weights))
        self.record(f"metrics_history {self.prefix}{name}", lambda: saved_history(checkpoint))

    def safe_files(self, checkpoint: Checkpoint) -> str:
        listed = set(checkpoint.manifest["files"])
        present = set(self.store.list_dir(self.layout.checkpoint_dir(checkpoint.name))) - {MANIFEST_FILE}
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

    def forward_transformer(self, checkpoint: Checkpoint) -> str:
        cfg = config_from_dict(checkpoint.state["config"])
        tokenizer = self.tokenizer_of(checkpoint)
        model = trained_transformer(checkpoint.model, cfg, tokenizer)
        videos, labels = self.validation_batch(cfg, with_labels=True)
        batch = model.mask_for_training(tokenizer.encode(videos), labels, generator=torch.Generator().manual_seed(0))
        logits = model(batch.tokens, batch.classes)
        expected = (len(videos), model.length, model.codebook_size)
        if tuple(logits.shape) != expected:
            raise CheckFailed(f"logits of shape {tuple(logits.shape)}, expected {expected}")
        if not torch.isfinite(logits).all():
            raise CheckFailed("the logits hold NaN or infinite values")
        accuracy = float(masked_token_loss(logits, batch)[1])
        return (f"{len(videos)} validation videos -> codes by tokenizer {checkpoint.state['tokenizer']['checkpoint']} "
                f"-> finite logits {expected}; masked-token accuracy {accuracy:.3f}")

    def tokenizer_of(self, checkpoint: Checkpoint) -> VideoTokenizer:
        """The stage-1 weights a stage-2 checkpoint learned from, verified and matched by sha256."""
        ref = checkpoint.state.get("tokenizer")
        if not isinstance(ref, dict):
            raise CheckFailed("state.safetensors does not name the tokenizer this checkpoint learned from")
        name = str(ref.get("checkpoint"))
        if name not in self.tokenizers:
            source = CheckpointReader(self.store, Layout.tokenizer).load(name)
            if source.manifest["files"][MODEL_FILE]["sha256"] != ref.get("sha256"):
                raise CheckFailed(f"tokenizer {name}'s weights differ from the sha256 this checkpoint learned from")
            cfg = config_from_dict(source.state["config"])
            self.tokenizers[name] = trained_tokenizer(source.model, cfg.model, cfg.data)
        return self.tokenizers[name]

    def initial_weights(self, checkpoint: Checkpoint) -> dict[str, torch.Tensor]:
        """The weights a run of this stage starts from: a pure function of the seed."""
        cfg = config_from_dict(checkpoint.state["config"])
        if self.stage == 1:
            return initial_tokenizer(cfg).state_dict()
        return build_transformer(cfg, self.tokenizer_of(checkpoint)).state_dict()

    def validation_batch(self, cfg: Config, with_labels: bool = False):
        key = json.dumps(cfg.to_dict()["data"], sort_keys=True)
        if key not in self.datasets:
            self.datasets[key] = prepare_dataset(cfg, self.store)
        dataset = self.datasets[key]
        videos, labels = dataset.get(dataset.split("val")[: cfg.train.batch_size])
        return (videos, labels) if with_labels else videos

    # --- per run -------------------------------------------------------------------------

    def metrics_file(self, newest: Checkpoint | None) -> str:
        """metrics.jsonl is rewritten from the checkpoint history on every resume, so it holds
        each epoch once; it may run ahead of the newest checkpoint, never behind it."""
        records = read_jsonl(self.store.read_bytes(self.layout.metrics) or b"")
        saved = newest.state["epoch"] if newest else 0
        last = max([saved, *[r.get("epoch") for r in records if isinstance(r.get("epoch"), int)]])
        problem = history_problem(records, last)
        if problem:
            raise CheckFailed(f"{self.layout.metrics}: {problem}")
        held = f"epochs 1..{last}, each once and in order" if last else "no epoch finished yet"
        return f"{held} ({f'{newest.name} saved {saved}' if newest else 'no sound checkpoint to compare with'})"

    def latest(self) -> str:
        latest = self.store.read_json(self.layout.latest)
        if not isinstance(latest, dict):
            raise CheckFailed(f"{self.layout.latest} is missing or not JSON")
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


def cadence(checkpoint: Checkpoint, previous: Checkpoint | None, stage: int = 1) -> str:
    state, manifest = checkpoint.state, checkpoint.manifest
    step, epoch = state["step"], state["epoch"]
    cfg = config_from_dict(state["config"])
    plan = stage_plans(cfg)[stage - 1]
    problems = []
    if checkpoint.name != Layout.checkpoint_name(step):
        problems.append(f"the folder's name does not match state.safetensors's step {step}")
    if (manifest.get("step"), manifest.get("epoch")) != (step, epoch):
        problems.append(f"manifest says step {manifest.get('step')} epoch {manifest.get('epoch')}, "
                        f"state.safetensors step {step} epoch {epoch}")
    if previous is not None and step <= previous.state["step"]:
        problems.append(f"step {step} goes backwards: {previous.name} holds step {previous.state['step']}")
    if previous is not None and epoch < previous.state["epoch"]:
        problems.append(f"epoch {epoch} goes backwards: {previous.name} holds epoch {previous.state['epoch']}")
    problems += position_problems(state, cfg, plan)
    problems += reason_problems(state, cfg, plan)
    if problems:
        raise CheckFailed("; ".join(problems))
    return f"step {step}, epoch {epoch}, {state['sample_in_epoch']} samples into the next; reason {state['reason']!r}"


def position_problems(state: dict[str, Any], cfg: Config, plan: StagePlan) -> list[str]:
    """Every step trains one batch of the epoch's order, so step, epoch and the position inside
    the epoch determine each other."""
    step, epoch, sample = state["step"], state["epoch"], state["sample_in_epoch"]
    n_train, batch_size = split_sizes(cfg.data)[0], plan.batch_size
    if not 0 <= sample <= n_train:
        return [f"sample_in_epoch {sample} outside 0..{n_train}"]
    expected = epoch * plan.steps_per_epoch(cfg) + math.ceil(sample / batch_size)
    problems = []
    if step != expected:
        problems.append(f"step {step}, but epoch {epoch} plus {sample} samples at batch size {batch_size} "
                        f"make step {expected}")
    total = plan.total_steps(cfg)
    if step > total:
        problems.append(f"step {step} beyond the run's {total} steps")
    return problems


def reason_problems(state: dict[str, Any], cfg: Config, plan: StagePlan) -> list[str]:
    """Whether the recorded reason could have triggered this checkpoint, under the checkpoint
    settings of the attempt that wrote it (they may change between attempts)."""
    step, epoch, sample, reason = state["step"], state["epoch"], state["sample_in_epoch"], state.get("reason")
    c = cfg.checkpoint
    total = plan.total_steps(cfg)
    allowed = {
        "epochs": (c.every_epochs > 0 and epoch > 0 and sample == 0 and epoch % c.every_epochs == 0,
                   f"the end of an epoch that is a multiple of checkpoint.every_epochs={c.every_epochs}"),
        "steps": (c.every_steps > 0 and step % c.every_steps == 0,
                  f"a step that is a multiple of checkpoint.every_steps={c.every_steps}"),
        "minutes": (c.every_minutes > 0, "checkpoint.every_minutes > 0"),
        "signal": (True, ""),
        "final": (step == total and sample == 0, f"the last step, {total} for {plan.epochs} epochs"),
    }
    if reason not in allowed:
        return [f"unknown reason {reason!r}"]
    fits, needs = allowed[reason]
    return [] if fits else [f"reason {reason!r} needs {needs}"]


def weights_changed(checkpoint: Checkpoint, previous: Checkpoint | None, initial_weights) -> str:
    if previous is None:
        reference = initial_weights(checkpoint)
        label = f"the initial weights (seed {checkpoint.state['config']['seed']})"
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
        raise CheckFailed("state.safetensors has no metrics list")
    problem = history_problem(metrics, state["epoch"])
    if problem:
        raise CheckFailed(f"state.safetensors metrics: {problem}")
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
