"""The checkpoint format (docs/run-folder.md; docs/storage.md): the files, the manifest, and
encoding a snapshot of the stateful parts into them.

A checkpoint is a folder ``checkpoints/step-NNNNNNNN/`` holding the state of a run's stateful
parts (``PARTS``):

- ``model.safetensors``: the weights alone; the same weights give the same bytes,
- ``state.safetensors``: everything else in one file, so that a checkpoint is two objects to
  write, hash and upload: the optimizer's tensors (``optimizer.*``), the random generators'
  states (``rng.*``), and as JSON in the file's metadata (``state``) the train state, the
  optimizer's and the schedule's numbers and the config,
- ``manifest.json``: written last, the sha256 and size of every file above plus step, epoch
  and created_at. A checkpoint counts only if its manifest names plain files of its own folder
  and every one of them matches; readers trust nothing else.

Nothing here unpickles: tensors go through safetensors, the rest through JSON. Checkpoints of
format 1 (optimizer, rng and state as three files) are not read: they are
refused as unreadable, naming their format. Reading them back is ``job.checkpoints.reader``'s;
writing them (when, which ones to keep, in which order) ``job.checkpoints.manager``'s.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Protocol

import structlog
import torch
from safetensors.numpy import save as save_arrays
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from job.runtime.files import json_bytes
from job.storage import Layout

MODEL_FILE = "model.safetensors"
STATE_FILE = "state.safetensors"
MANIFEST_FILE = Layout.checkpoint_manifest_file
DATA_FILES = (MODEL_FILE, STATE_FILE)
FORMAT_VERSION = 2
STATE_METADATA_KEY = "state"  # the entry of state.safetensors' metadata that holds the JSON state
# The stateful parts a checkpoint holds, by name; each has state_dict() / load_state_dict().
PARTS = ("model", "optimizer", "scheduler", "rng", "train")

log = structlog.get_logger("job.checkpoint")


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


class RNGState:
    """The process's random generators as a stateful part: CPU always, CUDA when present."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        states = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            states.update({f"cuda.{i:02d}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        return states

    def load_state_dict(self, states: dict[str, torch.Tensor]) -> None:
        torch.set_rng_state(states["cpu"])
        cuda_states = [states[k] for k in sorted(states) if k.startswith("cuda.")]
        if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


@dataclass
class Snapshot:
    """Everything a checkpoint holds, copied off the live parts into host memory, so that
    training can go on while it is written."""

    model: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor]
    rng: dict[str, torch.Tensor]
    state_json: bytes

    def encode(self) -> dict[str, bytes]:
        """The files of a checkpoint, as bytes (no manifest yet)."""
        return {MODEL_FILE: tensor_file(self.model), STATE_FILE: encode_state(self.optimizer, self.rng, self.state_json)}


def encode_state(optimizer: dict[str, torch.Tensor], rng: dict[str, torch.Tensor], state_json: bytes) -> bytes:
    """state.safetensors: the optimizer's and the generators' tensors, the JSON state as metadata."""
    tensors = {**{f"optimizer.{k}": v for k, v in optimizer.items()}, **{f"rng.{k}": v for k, v in rng.items()}}
    return tensor_file(tensors, metadata={STATE_METADATA_KEY: state_json.decode()})


# The dtypes numpy holds as themselves (not bfloat16 or float8, which only the torch front end writes).
NUMPY_DTYPES = frozenset({
    torch.float64, torch.float32, torch.float16, torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8,
    torch.bool,
})

# Up to this many bytes in all, a file is encoded through safetensors' numpy front end: the same
# bytes as its torch one, with less Python per tensor, while the writer thread holds the
# interpreter lock. Its copy per byte costs more, so large files keep the torch front end
# (docs/benchmarks.md, "Why the code is as it is").
SMALL_FILE_BYTES = 16 << 20


def tensor_file(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """A safetensors file of CPU tensors; the same tensors always give the same bytes, whichever
    front end encodes them."""
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    if size <= SMALL_FILE_BYTES and all(t.dtype in NUMPY_DTYPES for t in tensors.values()):
        return save_arrays({k: t.detach().numpy() for k, t in tensors.items()}, metadata=metadata)
    return save_tensors(tensors, metadata=metadata)


def decode_state(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], Any]:
    """(optimizer tensors, rng tensors, JSON state) of a state.safetensors. safetensors' Python
    API reads metadata only from a path, so it is taken from the header as the format defines
    it: 8 bytes of little-endian header length, then the header's JSON."""
    tensors = load_tensors(data)
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    state = json.loads(header["__metadata__"][STATE_METADATA_KEY])
    parts: dict[str, dict[str, torch.Tensor]] = {"optimizer": {}, "rng": {}}
    for key, tensor in tensors.items():
        part, name = key.split(".", 1)
        parts[part][name] = tensor
    return parts["optimizer"], parts["rng"], state


def take_snapshot(parts: dict[str, Stateful], extra: dict[str, Any]) -> Snapshot:
    """The part of a checkpoint the training thread waits for: copies, nothing else. ``extra``
    (the config, the reason) goes into the JSON state beside the parts' numbers."""
    optimizer_tensors, optimizer_json = _split_optimizer_state(parts["optimizer"].state_dict())
    state = {
        **parts["train"].state_dict(),
        "optimizer": optimizer_json,
        "scheduler": parts["scheduler"].state_dict(),
        **extra,
    }
    return Snapshot(
        model=_host_copy(parts["model"].state_dict()),
        optimizer=_host_copy(optimizer_tensors),
        rng=_host_copy(parts["rng"].state_dict()),
        state_json=json_bytes(state),
    )


def make_manifest(files: dict[str, bytes], step: int, epoch: int) -> dict[str, Any]:
    return {
        "format": FORMAT_VERSION,
        "step": step,
        "epoch": epoch,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "files": {
            name: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
            for name, data in sorted(files.items())
        },
    }


# --- encoding helpers --------------------------------------------------------------------


def _host_copy(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copies, never views: training goes on changing the originals while these are written.

    On one intra-op thread: a copy is bound by memory bandwidth, and a parallel one waits at a
    barrier per tensor for all of torch's threads, each of which a busy machine may have
    descheduled for a while (docs/benchmarks.md, "Why the code is as it is")."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    finally:
        torch.set_num_threads(threads)


def _split_optimizer_state(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer state as (tensors for safetensors, the rest for JSON)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for param_id, param_state in state_dict["state"].items():
        for key, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{param_id}.{key}"] = value
            else:
                scalars.setdefault(str(param_id), {})[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _join_optimizer_state(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, param_id, name = key.split(".", 2)
        state.setdefault(int(param_id), {})[name] = value
    for param_id, values in rest["scalars"].items():
        state.setdefault(int(param_id), {}).update(values)
    return {"state": state, "param_groups": rest["param_groups"]}
