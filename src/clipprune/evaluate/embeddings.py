"""Text-side embeddings that one model's evaluation lends to another's: zero-shot classifiers, caption features.

Pruning only the vision tower leaves the text tower as it was, so the dense model's class embeddings and
caption embeddings are those of the pruned, distilled and masked models as well. They are reused only where
that holds by construction, decided from the content and never from params:

* the text tower's fingerprint (:func:`text_tower_fingerprint`) is equal: a sha256 over every parameter and
  buffer the text encoder uses (names, dtypes, shapes, strides, bytes, and where in memory each starts
  modulo 64 bytes), the type and plain settings of every module it is made of, the text blocks' widths, and
  what picks the kernels: device type, torch version, CPU capability, thread count, float32 matmul precision;
* the token ids of the texts are equal (a sha256 of the token tensor, kept per entry), and so is the batch
  size the texts are encoded in.

Then the same kernels do the same arithmetic on the same numbers, and the embeddings come out the same bits
(tested against a fresh encoding). Alignment and threads are in the fingerprint because CPU kernels choose
their code path, hence their rounding, by them: a transformers model loaded from a memory-mapped file has
tensors at arbitrary offsets and encodes 1 ulp differently from the same weights in fresh storage
(:func:`reallocate_tensors` puts a loaded dense model on the footing of the models ``load_pruned`` builds).
A text tower with hooks on any of its modules (mask hooks change what it computes) has no fingerprint: its
texts are always encoded.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from ..errors import DataError
from ..io import FLOATING, read_safetensors, save_safetensors
from ..models.base import ClipModel
from .zeroshot import (Template, classifier_from_embeddings, encode_tokens, model_device, prompt_texts,
                       tokenize_texts)

FORMAT = "clipprune-text-embeddings"
# top-level children of each family's module that are not part of the text encoder
_NOT_TEXT = {"open_clip": ("visual", "logit_scale", "logit_bias"),
             "hf": ("vision_model", "visual_projection", "logit_scale", "logit_bias")}
_SCALARS = (bool, int, float, str, type(None))
# where a transformers model was loaded from, not what it computes (a rebuilt pruned model has other values)
_PROVENANCE = {"name_or_path", "_name_or_path", "_commit_hash", "transformers_version", "architectures"}


def _in_text_tower(name: str, family: str) -> bool:
    return name.split(".", 1)[0] not in _NOT_TEXT[family]


def _has_hooks(module: nn.Module) -> bool:
    return any(getattr(module, attr, None) for attr in (
        "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"))


def _global_hooks() -> bool:
    from torch.nn.modules import module as torch_module

    return any(getattr(torch_module, attr, None) for attr in (
        "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
        "_global_backward_pre_hooks"))


def _settings(module: nn.Module) -> dict:
    """A module's plain attributes (numbers, strings, tuples of them) and, for transformers, its config."""
    out = {}
    for key, value in sorted(vars(module).items()):
        if (key.startswith("_") and key != "_attn_implementation") or key in _PROVENANCE:
            continue
        if isinstance(value, _SCALARS) or (isinstance(value, tuple) and all(isinstance(v, _SCALARS) for v in value)):
            out[key] = list(value) if isinstance(value, tuple) else value
    config = getattr(module, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        out["config"] = json.dumps(_without_provenance(config.to_dict()), sort_keys=True, default=str)
        out["config_attn_implementation"] = str(getattr(config, "_attn_implementation", None))
    return out


def _without_provenance(value):
    if isinstance(value, dict):
        return {k: _without_provenance(v) for k, v in value.items() if k not in _PROVENANCE}
    return value


def _update_tensor(digest, name: str, tensor: torch.Tensor, layout: bool = False) -> None:
    """Add a tensor's name, dtype, shape and bytes (and with ``layout`` its strides and alignment)."""
    tensor = tensor.detach()
    header = [name, str(tensor.dtype), list(tensor.shape)]
    if layout:
        header += [list(tensor.stride()), tensor.data_ptr() % 64]
    digest.update(json.dumps(header).encode())
    data = tensor.to("cpu").contiguous()
    if data.numel():
        digest.update(data.reshape(-1).view(torch.uint8).numpy())


def _kernel_environment(device: torch.device) -> dict:
    """What selects the kernels (and so the rounding) of a forward pass on ``device``."""
    env = {"device": device.type, "torch": torch.__version__, "threads": torch.get_num_threads(),
           "matmul_precision": torch.get_float32_matmul_precision(),
           "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    if device.type == "cuda":
        env.update(cuda_device=torch.cuda.get_device_name(device), tf32=torch.backends.cuda.matmul.allow_tf32,
                   cudnn_tf32=torch.backends.cudnn.allow_tf32)
    return env


@torch.no_grad()
def reallocate_tensors(model: ClipModel) -> ClipModel:
    """Give every parameter and buffer of ``model`` its own freshly allocated storage (values unchanged).

    torch allocates CPU tensors 64-byte aligned; a model loaded from a memory-mapped file (transformers)
    holds views at arbitrary offsets, on which CPU kernels round differently. Returns ``model``.
    """
    for tensor in list(model.module.parameters()) + list(model.module.buffers()):
        tensor.data = tensor.data.clone(memory_format=torch.contiguous_format)
    return model


@torch.no_grad()
def text_tower_fingerprint(model: ClipModel) -> str | None:
    """sha256 of everything the text encoder computes with, or None when that cannot be vouched for.

    None for a model family this module does not know, a model without a text tower, or hooks on any
    module of the text tower (or global module hooks).
    """
    family = getattr(model, "family", None)
    towers = getattr(model, "towers", {})
    if family not in _NOT_TEXT or "text" not in towers or _global_hooks():
        return None
    digest = hashlib.sha256()
    digest.update(json.dumps({"family": family, "environment": _kernel_environment(model_device(model)),
                              "widths": [view.as_dict() for view in towers["text"].block_views()]},
                             sort_keys=True).encode())
    for name, module in model.module.named_modules():
        if name and not _in_text_tower(name, family):
            continue
        if _has_hooks(module):
            return None
        kind = f"{type(module).__module__}.{type(module).__qualname__}"
        digest.update(json.dumps([name, kind, _settings(module)], sort_keys=True, default=str).encode())
    for name, tensor in model.module.named_parameters():
        if _in_text_tower(name, family):
            _update_tensor(digest, f"parameter {name}", tensor, layout=True)
    for name, tensor in model.module.named_buffers():
        if _in_text_tower(name, family):
            _update_tensor(digest, f"buffer {name}", tensor, layout=True)
    return digest.hexdigest()


def token_digest(tokens: torch.Tensor) -> str:
    """sha256 of a token-id tensor (dtype, shape and values)."""
    digest = hashlib.sha256()
    _update_tensor(digest, "tokens", tokens)
    return digest.hexdigest()


@dataclass
class TextEmbeddings:
    """Text embeddings of one model: ``entries[key] = (meta, tensor)``, with what they were made from.

    ``meta`` holds ``kind`` (``classifier``: zero-shot weights (embed_dim, n_classes); ``captions``: caption
    embeddings (n, embed_dim)), ``tokens`` (:func:`token_digest` of the encoded token ids) and, for
    classifiers, ``shape`` ([n_classes, n_templates]).
    """

    fingerprint: str | None
    batch_size: int
    entries: dict[str, tuple[dict, torch.Tensor]] = field(default_factory=dict)
    source: str = "text embeddings"  # where they came from, for error messages


def save_text_embeddings(path: str | os.PathLike, embeddings: TextEmbeddings) -> None:
    """Write ``embeddings`` as safetensors (byte-stable), the fingerprint and entry metadata in the header."""
    tensors = {key: tensor for key, (_, tensor) in embeddings.entries.items()}
    metadata = {"format": FORMAT, "fingerprint": json.dumps(embeddings.fingerprint),
                "batch_size": json.dumps(embeddings.batch_size),
                "entries": json.dumps({key: meta for key, (meta, _) in embeddings.entries.items()}, sort_keys=True)}
    save_safetensors(path, tensors, metadata)


def load_text_embeddings(path: str | os.PathLike) -> TextEmbeddings:
    """Read a file written by :func:`save_text_embeddings` (DataError naming the file if it is not one)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"{path}: text embeddings file not found")
    tensors, metadata = read_safetensors(path, error=DataError, unreadable="not a readable text embeddings file",
                                         dtypes={"*": FLOATING})
    try:
        if metadata.get("format") != FORMAT:
            raise ValueError(f"format is {metadata.get('format')!r}, expected {FORMAT!r}")
        fingerprint = json.loads(metadata["fingerprint"])
        batch_size = json.loads(metadata["batch_size"])
        metas = json.loads(metadata["entries"])
        if set(metas) != set(tensors):
            raise ValueError("entry metadata and tensors disagree")
    except (KeyError, TypeError, ValueError) as err:  # json.JSONDecodeError is a ValueError
        raise DataError(f"{path}: not a readable text embeddings file ({err})") from None
    return TextEmbeddings(fingerprint, batch_size, {key: (metas[key], tensors[key]) for key in sorted(tensors)},
                          source=path)


class TextEncoder:
    """The text side of one model's evaluation: encodes texts, or takes the dense model's embeddings.

    ``reuse`` (the dense model's :class:`TextEmbeddings`) is used when this model's text tower fingerprint
    (taken when the encoder is made, i.e. with the hooks in effect then) and the batch size equal theirs;
    then every requested entry must be among them with the same token ids, else a DataError says they are
    stale. ``embeddings()`` returns what this encoder produced (to save the dense model's).
    """

    def __init__(self, model: ClipModel, batch_size: int, reuse: TextEmbeddings | None = None):
        self.model = model
        self.batch_size = batch_size
        self.fingerprint = text_tower_fingerprint(model)
        self.reusing = (reuse is not None and self.fingerprint is not None
                        and reuse.fingerprint == self.fingerprint and reuse.batch_size == batch_size)
        self._reuse = reuse if self.reusing else None
        self._entries: dict[str, tuple[dict, torch.Tensor]] = {}

    def _lookup(self, key: str, meta: dict) -> torch.Tensor | None:
        if self._reuse is None:
            return None
        stored = self._reuse.entries.get(key)
        if stored is None or stored[0] != meta:
            what = "has no entry" if stored is None else "was made from other texts"
            raise DataError(f"{self._reuse.source}: {key} {what} than this evaluation asks for; the dense "
                            f"evaluation is stale (rerun the evaluate_dense stage)")
        return stored[1]

    def _keep(self, key: str, meta: dict, tensor: torch.Tensor) -> torch.Tensor:
        self._entries[key] = (meta, tensor)
        return tensor

    def classifier(self, key: str, classnames: Sequence[str], templates: Sequence[Template],
                   progress: bool = True, desc: str = "zero-shot classifier") -> torch.Tensor:
        """Zero-shot weights (embed_dim, n_classes) on the model's device (see ``zeroshot.build_classifier``)."""
        texts = prompt_texts(classnames, templates)
        tokens = tokenize_texts(self.model, texts, self.batch_size)
        shape = [len(list(classnames)), len(list(templates))]
        meta = {"kind": "classifier", "tokens": token_digest(tokens), "shape": shape}
        weights = self._lookup(key, meta)
        if weights is None:
            embeddings = encode_tokens(self.model, tokens, self.batch_size, progress, desc)
            weights = classifier_from_embeddings(embeddings, *shape)
        return self._keep(key, meta, weights.cpu()).to(model_device(self.model))

    def captions(self, key: str, captions: Sequence[str], progress: bool = True,
                 desc: str = "retrieval captions") -> torch.Tensor:
        """Caption embeddings (n, embed_dim), not normalised, on CPU (see ``zeroshot.encode_texts``)."""
        tokens = tokenize_texts(self.model, list(captions), self.batch_size)
        meta = {"kind": "captions", "tokens": token_digest(tokens)}
        features = self._lookup(key, meta)
        if features is None:
            features = encode_tokens(self.model, tokens, self.batch_size, progress, desc)
        return self._keep(key, meta, features)

    def embeddings(self) -> TextEmbeddings:
        return TextEmbeddings(self.fingerprint, self.batch_size, dict(sorted(self._entries.items())))
