"""2:4 weights on NVIDIA sparse tensor cores: ``torch.sparse.to_sparse_semi_structured`` (fp16 / bf16, CUDA
compute capability >= 8.0) turns a 2:4-masked Linear weight into the compressed form (kept values + 2-bit
indices) that cuSPARSELt / CUTLASS kernels multiply directly.

The compressed form is a runtime representation (a tensor subclass, not something safetensors stores): the
sparse export stays the bitmask format, and ``to_semi_structured`` converts a loaded model in place.
``check_semi_structured`` converts a copy and compares its ``encode_image`` with the masked dense model in the
same dtype. Without CUDA nothing is converted and the decision is logged once: on CPU, unstructured and N:M
sparsity give a smaller file, not speed (torch's CPU kernels multiply the zeros like any other weight).
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from clipprune.errors import MaskError
from clipprune.models.base import ClipModel

from .layers import prunable_linears
from .masks import holds_nm

log = logging.getLogger(__name__)

CPU_DECISION = ("semi-structured 2:4: no CUDA device (compute capability >= 8.0); weights stay dense with zeros: "
                "on CPU, weight sparsity gives file size, not speed")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def semi_structured_support() -> tuple[bool, str]:
    """(usable, why not): CUDA with compute capability >= 8.0 (Ampere or newer)."""
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return False, f"CUDA compute capability {major}.{minor} < 8.0"
    return True, ""


def to_semi_structured(model: ClipModel, towers, dtype: torch.dtype = torch.float16) -> dict:
    """Convert every prunable Linear weight of ``towers`` (each must hold 2:4) to the semi-structured form, in
    place; the model is moved to CUDA in ``dtype`` first. Returns ``{"converted": [...], "dense": {layer:
    why}, "reason": ...}``: a layer whose shape the kernels do not take stays dense (and is listed). Without a
    usable device nothing changes and ``reason`` says why (the decision is logged)."""
    usable, why = semi_structured_support()
    if not usable:
        log.info("%s (%s)", CPU_DECISION, why)
        return {"converted": [], "dense": {}, "reason": why}
    from torch.sparse import to_sparse_semi_structured

    layers = prunable_linears(model, towers)
    for name, layer in layers.items():
        if not holds_nm(layer.weight, 2, 4):
            raise MaskError(f"semi-structured 2:4: layer {name} does not hold a 2:4 pattern (prune with "
                            f"sparsity.mask_type \"2:4\")")
    model.module.to(device="cuda", dtype=dtype)
    converted, dense = [], {}
    for name, layer in layers.items():
        try:
            compressed = to_sparse_semi_structured(layer.weight.detach())
        except (RuntimeError, ValueError) as err:  # shapes / dtypes the kernels reject stay dense
            dense[name] = str(err).splitlines()[0][:200]
            continue
        layer.weight = nn.Parameter(compressed, requires_grad=False)
        converted.append(name)
    return {"converted": converted, "dense": dense, "reason": ""}


@torch.no_grad()
def check_semi_structured(model: ClipModel, towers, images: torch.Tensor, dtype: torch.dtype = torch.float16) -> dict:
    """Convert a copy of ``model`` and compare its ``encode_image`` on ``images`` with the masked dense copy in
    the same dtype on the same device. Returns the conversion summary plus ``max_abs_diff`` and the dense
    output's ``max_abs`` (or only the reason when no device is usable)."""
    usable, why = semi_structured_support()
    if not usable:
        log.info("%s (%s)", CPU_DECISION, why)
        return {"used": False, "reason": why, "statement": CPU_DECISION}
    dense = model.copy()
    dense.module.to(device="cuda", dtype=dtype)
    sparse = model.copy()
    summary = to_semi_structured(sparse, towers, dtype)
    x = images.to("cuda", dtype)
    reference, out = dense.encode_image(x).float(), sparse.encode_image(x).float()
    return {"used": True, "dtype": str(dtype).removeprefix("torch."), **summary,
            "max_abs_diff": float((out - reference).abs().max()), "max_abs": float(reference.abs().max())}
