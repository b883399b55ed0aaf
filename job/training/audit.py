"""verify's checks: every checkpoint of one stage of a run, proven sound one named check at a time
(docs/run-folder.md, "verify").

For each checkpoint folder, oldest first:

- ``manifest``: manifest.json exists and every file it lists has its size and sha256;
- ``safe_load``: the files parse with the safe loaders (safetensors, JSON) and the folder holds
  nothing else (a planted pickle is never loaded by the job, but it does not belong there);
- ``forward``: the model rebuilt from the checkpoint's own config takes a validation batch to
  finite output of the right shape (the stage's ``forward_check``);
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
from dataclasses import dataclass
from typing import Any

import structlog
import torch

from job.checkpoints.format import MANIFEST_FILE
from job.checkpoints.reader import Checkpoint, CheckpointReader, ManifestMismatch, SourceRef, UnreadableCheckpoint
from job.config import Config, config_from_dict, split_sizes
from job.data.dataset import VideoDataset, prepare_dataset
from job.runtime.signals import stop_point
from job.storage import Layout, RunStore
from job.training.stages import TOKENIZER, CheckFailed, Stage

log = structlog.get_logger("job.verify")

SAFE_SUFFIXES = (".safetensors", ".json")


@dataclass
class Check:
    name: str
    passed: bool
    detail: str


class RunVerifier:
    """Runs the checks over the checkpoints of one stage of a run folder and collects their
    results in order."""

    def __init__(self, store: RunStore, stage: Stage, datasets: dict[str, VideoDataset]):
        self.store = store
        self.stage = stage
        self.layout = stage.layout
        self.prefix = self.layout.label  # in check names: the layout label, then the checkpoint name
        self.suffix = f" {self.layout.label.rstrip('/')}" if self.layout.label else ""  # after "latest" and "checkpoints"
        self.checkpointer = CheckpointReader(store, self.layout)
        self.names = self.checkpointer.names()
        self.checks: list[Check] = []
        self.sound_steps: dict[str, int] = {}  # committed checkpoints that loaded, by name
        self.datasets = datasets  # by data config: prepared once per run
        self.sources: dict[str, torch.nn.Module] = {}  # the models of the stage learned from, by checkpoint name

    def run(self) -> list[Check]:
        where = f"{self.store.uri.rstrip('/')}/{self.layout.checkpoints}"
        if not self.names and self.stage.optional:
            self.add(f"checkpoints{self.suffix}", True,
                     f"no checkpoint folder under {where}: stage {self.stage.number} has not started")
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
        self.record(f"latest{self.suffix}", self.latest)
        self.record(f"checkpoints{self.suffix}", lambda: self.summary(committed))
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
        self.record(f"forward {self.prefix}{name}", lambda: self.forward(checkpoint))
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
        source = self.source_of(checkpoint)
        model = self.stage.trained_model(checkpoint.model, cfg, source)
        videos, labels = self.validation_batch(cfg)
        with torch.no_grad():
            done = self.stage.forward_check(model, videos, labels, source)
        learned_from = self.stage.learns_from
        return done if learned_from is None else f"{done} ({learned_from.name} {checkpoint.state[learned_from.name]['checkpoint']})"

    def source_of(self, checkpoint: Checkpoint, stage: Stage | None = None) -> torch.nn.Module | None:
        """The model of the earlier stage that a checkpoint (of ``stage``, by default this
        verifier's) learned from, verified and matched by the sha256 the checkpoint recorded; None
        for a stage that learns from none."""
        learned_from = (stage or self.stage).learns_from
        if learned_from is None:
            return None
        ref = checkpoint.state.get(learned_from.name)
        if not isinstance(ref, dict):
            raise CheckFailed(f"state.safetensors does not name the {learned_from.name} this checkpoint learned from")
        name = str(ref.get("checkpoint"))
        if name not in self.sources:
            source = CheckpointReader(self.store, learned_from.layout).load(name)
            if SourceRef.of(source).sha256 != ref.get("sha256"):
                raise CheckFailed(f"{learned_from.name} {name}'s weights differ from the sha256 this checkpoint learned from")
            cfg = config_from_dict(source.state["config"])
            self.sources[name] = learned_from.trained_model(source.model, cfg, self.source_of(source, learned_from))
        return self.sources[name]

    def initial_weights(self, checkpoint: Checkpoint) -> dict[str, torch.Tensor]:
        """The weights a run of this stage starts from: a pure function of the seed."""
        cfg = config_from_dict(checkpoint.state["config"])
        return self.stage.initial_model(cfg, self.source_of(checkpoint)).state_dict()

    def validation_batch(self, cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
        key = json.dumps(cfg.to_dict()["data"], sort_keys=True)
        if key not in self.datasets:
            self.datasets[key] = prepare_dataset(cfg, self.store)
        dataset = self.datasets[key]
        return dataset.get(dataset.split("val")[: cfg.train.batch_size])

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


def cadence(checkpoint: Checkpoint, previous: Checkpoint | None, stage: Stage = TOKENIZER) -> str:
    state, manifest = checkpoint.state, checkpoint.manifest
    step, epoch = state["step"], state["epoch"]
    cfg = config_from_dict(state["config"])
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
    problems += position_problems(state, cfg, stage)
    problems += reason_problems(state, cfg, stage)
    if problems:
        raise CheckFailed("; ".join(problems))
    return f"step {step}, epoch {epoch}, {state['sample_in_epoch']} samples into the next; reason {state['reason']!r}"


def position_problems(state: dict[str, Any], cfg: Config, stage: Stage) -> list[str]:
    """Every step trains one batch of the epoch's order, so step, epoch and the position inside
    the epoch determine each other."""
    step, epoch, sample = state["step"], state["epoch"], state["sample_in_epoch"]
    n_train, batch_size = split_sizes(cfg.data)[0], stage.batch_size(cfg)
    if not 0 <= sample <= n_train:
        return [f"sample_in_epoch {sample} outside 0..{n_train}"]
    expected = epoch * stage.steps_per_epoch(cfg) + math.ceil(sample / batch_size)
    problems = []
    if step != expected:
        problems.append(f"step {step}, but epoch {epoch} plus {sample} samples at batch size {batch_size} "
                        f"make step {expected}")
    total = stage.total_steps(cfg)
    if step > total:
        problems.append(f"step {step} beyond the run's {total} steps")
    return problems


def reason_problems(state: dict[str, Any], cfg: Config, stage: Stage) -> list[str]:
    """Whether the recorded reason could have triggered this checkpoint, under the checkpoint
    settings of the attempt that wrote it (they may change between attempts)."""
    step, epoch, sample, reason = state["step"], state["epoch"], state["sample_in_epoch"], state.get("reason")
    c = cfg.checkpoint
    total = stage.total_steps(cfg)
    allowed = {
        "epochs": (c.every_epochs > 0 and epoch > 0 and sample == 0 and epoch % c.every_epochs == 0,
                   f"the end of an epoch that is a multiple of checkpoint.every_epochs={c.every_epochs}"),
        "steps": (c.every_steps > 0 and step % c.every_steps == 0,
                  f"a step that is a multiple of checkpoint.every_steps={c.every_steps}"),
        "minutes": (c.every_minutes > 0, "checkpoint.every_minutes > 0"),
        "signal": (True, ""),
        "final": (step == total and sample == 0, f"the last step, {total} for {stage.epochs(cfg)} epochs"),
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
