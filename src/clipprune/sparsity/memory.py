"""Memory plan of CAP's block Fisher factors, made before the first one is allocated.

The factors of a layer with ``n`` weights take ``ceil(n / B) · B² · itemsize`` bytes (15.8 GiB for the
vision tower of ViT-B/32 at B = 50 in float32). One calibration pass builds the factors of a chunk of
``chunk_layers`` layers at once; the plan estimates the peak of the largest chunk (its factors, the OBS
traces of all layers, one layer's per-sample gradients and the float64 work space) and compares it with
the memory available now:

* ``chunk_layers: auto`` takes the largest chunk that fits (all layers: one pass, factors kept in memory);
* ``null`` (all layers) or a number is checked as given;

and anything that does not fit stops with one line naming the key to change, before any work.
"""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass

import psutil

from clipprune.distributed import current
from clipprune.errors import ParamError

from .fisher import COMPUTE_DTYPE, UPDATE_CHUNK, fisher_memory_bytes, num_blocks

GIB = 2 ** 30
HEADROOM = 0.8  # share of the available memory (or free disk) the plan may use
SWEEP_CHUNK = 256  # blocks swept together: their float64 inverses (~5 MB at B=50) stay in cache across steps


def available_memory() -> int:
    """Bytes of memory available to this process now (psutil: MemAvailable on Linux); data parallel, its share
    of the machine's, equal on every rank (each rank builds the same factors, and the ranks must make the same
    plan: it decides how many calibration passes they make together)."""
    return current().share_of_machine(int(psutil.virtual_memory().available))


def free_disk(path: str | None = None) -> int:
    """Free bytes where ``offload`` writes the factors (the temporary directory); data parallel, as
    ``available_memory``."""
    return current().share_of_machine(int(shutil.disk_usage(path or tempfile.gettempdir()).free))


@dataclass(frozen=True)
class FisherPlan:
    chunk_layers: int
    mode: str  # "memory" (one pass, factors kept) | "disk" (offload) | "rebuild" (a second pass per chunk)
    factor_bytes: int  # the factors of all layers
    peak_bytes: int  # estimated peak of the largest chunk
    available_bytes: int
    layers: int

    @property
    def chunks(self) -> int:
        return -(-self.layers // self.chunk_layers)

    def describe(self) -> str:
        kept = {"memory": "kept in memory for the second sweep",
                "disk": "written to disk between the sweeps (offload)",
                "rebuild": "rebuilt by a second calibration pass per chunk"}[self.mode]
        return (f"Fisher factors of {self.layers} layers take {self.factor_bytes / GIB:.2f} GiB; "
                f"{self.chunk_layers} layer(s) per calibration pass ({self.chunks} chunk(s), est. peak "
                f"{self.peak_bytes / GIB:.2f} GiB of {self.available_bytes / GIB:.2f} GiB available), {kept}")


def chunk_peak(numels: list[int], chunk: int, block_size: int, itemsize: int, batch_size: int) -> int:
    """Estimated peak bytes with ``chunk`` layers per pass (see the module docstring)."""
    factors = max(sum(fisher_memory_bytes(n, block_size, itemsize) for n in numels[i:i + chunk])
                  for i in range(0, len(numels), chunk))
    compute = COMPUTE_DTYPE.itemsize
    traces = sum(num_blocks(n, block_size) * block_size for n in numels) * compute  # cumulative losses
    largest = max(numels)
    work = (3 * UPDATE_CHUNK + 2 * SWEEP_CHUNK) * block_size ** 2 * compute  # float64 factors / inverses
    work += 2 * batch_size * largest * 4 + 3 * largest * compute  # one layer's gradients, its sweep
    return factors + traces + work


def plan_fisher_memory(names: list[str], numels: list[int], block_size: int, itemsize: int, batch_size: int,
                       chunk_layers, offload: bool, available: int, disk: int | None = None) -> FisherPlan:
    """The chunking for ``chunk_layers`` (auto | None | int), or a ParamError when it does not fit."""
    count = len(numels)
    budget = int(available * HEADROOM)

    def peak(chunk):
        return chunk_peak(numels, chunk, block_size, itemsize, batch_size)

    def gib(value):
        return f"{value / GIB:.2f} GiB"

    have = f"{gib(available)} of memory is available"
    one = peak(1)
    if one > budget:
        largest = names[max(range(count), key=numels.__getitem__)]
        raise ParamError(f"sparsity.fisher_block_size: the Fisher factors of layer {largest} alone need about "
                         f"{gib(one)} at B={block_size}, and {have}; lower sparsity.fisher_block_size (memory "
                         f"grows linearly with it) or sparsity.towers")
    if chunk_layers == "auto":
        chunk = max(k for k in range(1, count + 1) if peak(k) <= budget)
        chunk = -(-count // -(-count // chunk))  # as many passes, evener chunks: a lower peak
    else:
        chunk = count if chunk_layers is None else min(int(chunk_layers), count)
        if peak(chunk) > budget:
            given = "null (all layers in one pass)" if chunk_layers is None else str(chunk_layers)
            raise ParamError(f"sparsity.chunk_layers: {given} needs about {gib(peak(chunk))} and {have}; use "
                             f"sparsity.chunk_layers: auto (chooses the layers per pass that fit) or fewer "
                             f"layers (1 needs {gib(one)})")
    factor_bytes = sum(fisher_memory_bytes(n, block_size, itemsize) for n in numels)
    mode = "memory" if chunk >= count else ("disk" if offload else "rebuild")
    if mode == "disk":
        disk = free_disk() if disk is None else disk
        if factor_bytes > disk * HEADROOM:
            raise ParamError(f"sparsity.offload: the Fisher factors need {gib(factor_bytes)} on disk in "
                             f"{tempfile.gettempdir()} and {gib(disk)} is free; set sparsity.offload: false "
                             f"(rebuild them by a second calibration pass) or point TMPDIR at a larger disk")
    return FisherPlan(chunk, mode, factor_bytes, peak(chunk), available, count)
