"""Epoch checkpoints of a distillation run: one safetensors file, written atomically, never pickled.

Tensors: ``model/<state-dict name>`` (the trainable parameters only — the frozen rest is the pruned model
the fingerprint pins), ``masks/<key>`` (trainable mask scales, retraining), ``optim/<i>/<field>`` (AdamW
state of the i-th trained parameter), ``rng/torch`` (torch's CPU generator state, a uint8 tensor) and
``rng/cuda/<d>``. The header metadata holds ``format`` and ``state``: a JSON document with the run
fingerprint, completed epochs, optimizer step, the loss history, the optimizer's param groups and the
Python RNG state. Tensors and counters sit in one file renamed into place, so a kill can never leave
them disagreeing.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch

from ..errors import ClipPruneError
from ..io import read_safetensors, save_safetensors

FORMAT = "clipprune-distill-checkpoint"
FORMAT_VERSION = 1
_EXPECTED = "a distillation checkpoint written by the distill stage; delete it to start over"


class CheckpointError(ClipPruneError):
    """A checkpoint file is unreadable or belongs to another run."""


@dataclass
class Checkpoint:
    epoch: int  # completed epochs
    step: int  # optimizer steps taken
    history: list = field(default_factory=list)
    model: dict[str, torch.Tensor] = field(default_factory=dict)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    optimizer: dict = field(default_factory=dict)  # a torch optimizer state_dict
    rng: dict = field(default_factory=dict)  # {"torch": uint8 tensor, "cuda": [...], "python": [...]}


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": _json_random_state(random.getstate())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _json_random_state(state) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def save_checkpoint(path: str | os.PathLike, checkpoint: Checkpoint, fingerprint: str) -> Path:
    """Write ``checkpoint`` to ``path`` atomically."""
    tensors: dict[str, torch.Tensor] = {}
    for name, value in checkpoint.model.items():
        tensors[f"model/{name}"] = value.detach().cpu()
    for key, value in checkpoint.masks.items():
        tensors[f"masks/{key}"] = value.detach().cpu()
    optim_fields: dict[str, dict] = {}
    for index, entry in checkpoint.optimizer.get("state", {}).items():
        optim_fields[str(index)] = {}
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim/{index}/{name}"] = value.detach().cpu()
            else:
                optim_fields[str(index)][name] = value
    tensors["rng/torch"] = checkpoint.rng["torch"]
    for device, value in enumerate(checkpoint.rng.get("cuda", [])):
        tensors[f"rng/cuda/{device}"] = value
    state = {
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "epoch": checkpoint.epoch,
        "step": checkpoint.step,
        "history": checkpoint.history,
        "param_groups": checkpoint.optimizer.get("param_groups", []),
        "optim_fields": optim_fields,
        "python_rng": checkpoint.rng["python"],
    }
    path = Path(path)
    save_safetensors(path, tensors, {"format": FORMAT, "state": json.dumps(state, sort_keys=True)})
    return path


def load_checkpoint(path: str | os.PathLike, fingerprint: str) -> Checkpoint:
    """Read a checkpoint; CheckpointError (one line naming the file) if it is corrupt or from another run."""
    path = Path(path)
    tensors, meta = read_safetensors(path, error=CheckpointError, unreadable="corrupt or truncated",
                                     suffix=f"; expected {_EXPECTED}")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: header format is {meta.get('format')!r}, expected {_EXPECTED}")
    try:
        state = json.loads(meta["state"])
        epoch, step, history = int(state["epoch"]), int(state["step"]), list(state["history"])
        groups, fields, python_rng = state["param_groups"], state["optim_fields"], state["python_rng"]
        stored_fingerprint = str(state["fingerprint"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: malformed state header ({type(err).__name__}: {err}); "
                              f"expected {_EXPECTED}") from None
    if stored_fingerprint != fingerprint:
        raise CheckpointError(f"{path}: written by a run with other distill params, models or data (fingerprint "
                              f"{stored_fingerprint[:12]}, this run {fingerprint[:12]}); delete it to start over")
    if "rng/torch" not in tensors or tensors["rng/torch"].dtype != torch.uint8:
        raise CheckpointError(f"{path}: missing rng/torch (uint8 generator state); expected {_EXPECTED}")
    optim_state: dict[int, dict] = {}
    for index, extra in fields.items():
        optim_state[int(index)] = dict(extra)
    for key, value in tensors.items():
        if key.startswith("optim/"):
            _, index, name = key.split("/", 2)
            optim_state.setdefault(int(index), {})[name] = value
    cuda = [tensors[f"rng/cuda/{d}"] for d in range(sum(k.startswith("rng/cuda/") for k in tensors))]
    return Checkpoint(
        epoch=epoch, step=step, history=history,
        model={k.removeprefix("model/"): v for k, v in tensors.items() if k.startswith("model/")},
        masks={k.removeprefix("masks/"): v for k, v in tensors.items() if k.startswith("masks/")},
        optimizer={"state": optim_state, "param_groups": groups},
        rng={"torch": tensors["rng/torch"], "python": python_rng, **({"cuda": cuda} if cuda else {})},
    )


def check_against(path: Path, checkpoint: Checkpoint, model: Mapping[str, torch.Tensor],
                  masks: Mapping[str, torch.Tensor]) -> None:
    """CheckpointError unless the stored tensors have exactly the names and shapes of this run's."""
    for kind, stored, live in (("model", checkpoint.model, model), ("masks", checkpoint.masks, masks)):
        if set(stored) != set(live):
            missing = sorted(set(live) - set(stored))[:3]
            extra = sorted(set(stored) - set(live))[:3]
            raise CheckpointError(f"{path}: {kind} tensors differ from this run's (missing {missing}, unexpected "
                                  f"{extra}); expected {_EXPECTED}")
        for name, tensor in live.items():
            if tuple(stored[name].shape) != tuple(tensor.shape) or stored[name].dtype != tensor.dtype:
                raise CheckpointError(f"{path}: {kind}/{name} has shape {list(stored[name].shape)} "
                                      f"({str(stored[name].dtype).removeprefix('torch.')}), expected "
                                      f"{list(tensor.shape)} ({str(tensor.dtype).removeprefix('torch.')}); "
                                      f"expected {_EXPECTED}")
