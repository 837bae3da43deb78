"""Data parallelism through torch.distributed (gloo on CPU, nccl on GPU), for processes launched by torchrun.

A process started by torchrun sees ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` in its environment; a plain
process is rank 0 of 1 and does no communication, so every helper below is the identity there and a
one-process run takes exactly the code path it took before.

Two ways of combining work, for two needs:

* **training** (``distill``): ``average_gradients`` all-reduces gradients each step and ``gather`` concatenates
  features with autograd (summation order differs from one process: ~1e-6, not bit for bit);
* **data-parallel evaluation of fixed batches** (``score``, ``evaluate``...): batch ``i`` of a deterministic
  loader goes to rank ``i mod N`` (``shard_batches``), each rank computes its batches, and ``gather_batches``
  returns every batch's result, in the original order, on every rank. Sums over batches are then formed after
  the gather in batch order, so they are the same floats as in one process whenever the per-batch results are.

The process group has a timeout (``CLIPPRUNE_DIST_TIMEOUT_S``, default 1800 s): a rank that dies is noticed by
torchrun, which stops the others; a rank that hangs makes the others' next collective fail after the timeout
instead of waiting forever. The library uses the context made active by ``data_parallel`` (``current()``);
nothing here knows about stages or DVC.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterable, Iterator, Sequence

import torch

from .errors import ClipPruneError

TIMEOUT_ENV = "CLIPPRUNE_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 1800.0
_MAX_DIMS = 8  # gather_batches: tensors of up to this many dimensions


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialised: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def comm_device(self) -> torch.device:
        """Where tensors must be for a collective: the GPU under nccl, the CPU under gloo."""
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def owns(self, index: int) -> bool:
        """True if batch ``index`` is this rank's (``index mod world == rank``)."""
        return index % self.world == self.rank

    def average_gradients(self, params: Sequence[torch.Tensor]) -> None:
        """Replace each parameter's gradient by its mean over the processes (one flat all-reduce)."""
        if self.world == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        flat /= self.world
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p).clone()
            offset += n

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """Mean of a scalar over the processes (for logging)."""
        if self.world == 1:
            return value.detach()
        out = value.detach().clone()
        torch.distributed.all_reduce(out)
        return out / self.world

    def share_of_machine(self, amount: int) -> int:
        """This process's share of a resource the processes of one machine share (free memory, free disk), the
        same on every rank: the smallest ``amount // processes on the machine`` over the ranks (torchrun's
        ``LOCAL_WORLD_SIZE``), so that plans made from it agree. One process: ``amount``."""
        if self.world == 1:
            return amount
        local = int(os.environ.get("LOCAL_WORLD_SIZE", self.world))
        share = torch.tensor([amount // max(local, 1)], dtype=torch.int64)
        return min(int(part[0]) for part in self._all_gather_fixed(share))

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Element-wise sum of ``tensor`` over the processes (a new tensor, on ``tensor``'s device).

        The order of the additions is the backend's: use it for integer counts or where ~1 ulp does not
        matter; for float sums that must equal one process's, gather the parts (``gather_batches``) and add
        them in data order.
        """
        if self.world == 1:
            return tensor.clone()
        out = tensor.detach().to(self.comm_device).clone()
        torch.distributed.all_reduce(out)
        return out.to(tensor.device)

    def broadcast(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        """Rank ``src``'s ``tensor`` on every rank; the other ranks pass a tensor of the same shape and dtype (its
        values are ignored). Returns a tensor on ``tensor``'s device (one process: ``tensor`` itself)."""
        if self.world == 1:
            return tensor
        buffer = tensor.detach().to(self.comm_device).contiguous()
        torch.distributed.broadcast(buffer, src=src)
        return buffer.to(tensor.device)

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate every process's ``tensor`` along dim 0 in rank order; gradients flow back to owners."""
        if self.world == 1:
            return tensor
        if tensor.requires_grad:
            from torch.distributed.nn.functional import all_gather

            return torch.cat(all_gather(tensor), dim=0)
        parts = [torch.empty_like(tensor) for _ in range(self.world)]
        torch.distributed.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)

    def _all_gather_padded(self, tensor: torch.Tensor, length: int) -> list[torch.Tensor]:
        """all_gather of 1-D tensors of different lengths (each padded to ``length``), trimmed back."""
        sizes = self._all_gather_fixed(torch.tensor([tensor.numel()], dtype=torch.int64))
        padded = torch.zeros(length, dtype=tensor.dtype, device=self.comm_device)
        padded[:tensor.numel()] = tensor.to(self.comm_device)
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        torch.distributed.all_gather(parts, padded)
        return [part[:int(size[0])].cpu() for part, size in zip(parts, sizes)]

    def _all_gather_fixed(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        local = tensor.to(self.comm_device)
        parts = [torch.empty_like(local) for _ in range(self.world)]
        torch.distributed.all_gather(parts, local)
        return [part.cpu() for part in parts]

    def gather_batches(self, local: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Every rank's per-batch tensors, in the original batch order, on every rank (CPU tensors).

        ``local`` holds this rank's results for batches ``rank, rank + world, ...`` (``shard_batches``), in that
        order. Tensors may differ in their first dimension (a short last batch); the other dimensions and the
        dtype must agree across ranks. One process: ``local`` itself.
        """
        if self.world == 1:
            return list(local)
        if any(t.dim() > _MAX_DIMS or t.dim() == 0 for t in local):
            raise ValueError(f"gather_batches takes tensors of 1 to {_MAX_DIMS} dimensions")
        dtypes = {t.dtype for t in local}
        if len(dtypes) > 1:
            raise ValueError(f"gather_batches: this rank's batches have several dtypes {sorted(map(str, dtypes))}")
        # header per batch: ndim, then the shape padded with -1
        headers = torch.full((len(local), _MAX_DIMS + 1), -1, dtype=torch.int64)
        for row, t in enumerate(local):
            headers[row, 0] = t.dim()
            headers[row, 1:1 + t.dim()] = torch.tensor(t.shape)
        counts = [int(c[0]) for c in self._all_gather_fixed(torch.tensor([len(local)], dtype=torch.int64))]
        if not any(counts):
            return []
        all_headers = self._all_gather_padded(headers.reshape(-1), max(counts) * (_MAX_DIMS + 1))
        # one dtype for all: a rank without batches has none to say; take it from one that has
        dtype_codes = self._all_gather_fixed(torch.tensor([_DTYPE_CODES.index(local[0].dtype) if local else -1]))
        codes = {int(c[0]) for c in dtype_codes if int(c[0]) >= 0}
        if len(codes) > 1:
            raise ValueError("gather_batches: the ranks' batches have different dtypes")
        dtype = _DTYPE_CODES[codes.pop()] if codes else torch.float32
        flat_local = (torch.cat([t.detach().reshape(-1).to("cpu", dtype) for t in local]) if local
                      else torch.zeros(0, dtype=dtype))
        numels = []
        for rank_headers, count in zip(all_headers, counts):
            shapes = rank_headers.view(count, _MAX_DIMS + 1)
            numels.append(sum(int(torch.tensor(s[1:1 + int(s[0])].tolist()).prod()) for s in shapes))
        flats = self._all_gather_padded(flat_local, max(numels) if numels else 0)
        per_rank: list[list[torch.Tensor]] = []
        for rank_headers, count, flat in zip(all_headers, counts, flats):
            shapes = rank_headers.view(count, _MAX_DIMS + 1)
            parts, offset = [], 0
            for s in shapes:
                shape = [int(v) for v in s[1:1 + int(s[0])]]
                n = int(torch.tensor(shape).prod())
                parts.append(flat[offset:offset + n].view(shape))
                offset += n
            per_rank.append(parts)
        total = sum(counts)
        return [per_rank[index % self.world][index // self.world] for index in range(total)]

    def gather_json(self, local: Sequence[Any]) -> list[Any]:
        """``gather_batches`` for JSON-serialisable per-batch values (e.g. lists of captions); never pickles."""
        if self.world == 1:
            return list(local)
        encoded = [torch.frombuffer(bytearray(json.dumps(value).encode()), dtype=torch.uint8)
                   for value in local]
        return [json.loads(bytes(t.tolist()).decode()) for t in self.gather_batches(encoded)]

    def close(self) -> None:
        if self.initialised and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
            self.initialised = False


_DTYPE_CODES = [torch.float32, torch.float64, torch.int64, torch.int32, torch.uint8, torch.bool, torch.float16,
                torch.bfloat16]

_ACTIVE: DistContext | None = None


def current() -> DistContext:
    """The context made active by ``data_parallel``; a one-process context otherwise."""
    return _ACTIVE if _ACTIVE is not None else DistContext()


@contextlib.contextmanager
def data_parallel(ctx: DistContext) -> Iterator[DistContext]:
    """Make ``ctx`` the one library code shards its batches over (``current()``) inside the block."""
    global _ACTIVE
    previous, _ACTIVE = _ACTIVE, ctx
    try:
        yield ctx
    finally:
        _ACTIVE = previous


class shard_batches:
    """``(global batch index, batch)`` for this rank's batches: ``index mod world == rank``.

    A torch ``DataLoader`` (sequential sampler) is re-made with a batch sampler that holds only this rank's
    batches, so the other ranks' images are never read; any other iterable is walked and the others' batches
    skipped. One process: every batch. ``len()`` is the number of this rank's batches when the source has a
    length (progress bars show it).
    """

    def __init__(self, loader: Iterable, ctx: DistContext | None = None):
        self.loader, self.ctx = loader, ctx or current()

    def __len__(self) -> int:
        total = len(self.loader)
        return len(range(self.ctx.rank, total, self.ctx.world))

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        from torch.utils.data import BatchSampler, DataLoader, IterableDataset, SequentialSampler

        loader, ctx = self.loader, self.ctx
        if ctx.world == 1:
            yield from enumerate(loader)
            return
        if isinstance(loader, DataLoader) and isinstance(loader.sampler, SequentialSampler) \
                and loader.batch_size is not None and not isinstance(loader.dataset, IterableDataset):
            batches = list(BatchSampler(SequentialSampler(loader.dataset), loader.batch_size, loader.drop_last))
            mine = [i for i in range(len(batches)) if ctx.owns(i)]
            local = DataLoader(loader.dataset, batch_sampler=[batches[i] for i in mine],
                               num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                               pin_memory=loader.pin_memory)
            yield from zip(mine, local)
            return
        for index, batch in enumerate(loader):
            if ctx.owns(index):
                yield index, batch


def shard_rounds(loader: Iterable, ctx: DistContext | None = None) -> Iterator[tuple[list[int], tuple[int, Any] | None]]:
    """``shard_batches`` in lockstep rounds, for work combined batch by batch in the original order while each
    rank holds one batch at a time (CAP's per-sample gradients, SparseGPT's input statistics).

    Round ``k`` holds batches ``k·N ... k·N + N − 1``, batch ``k·N + r`` on rank ``r``. Yields per round
    ``(sizes, mine)``: the sizes (``len(batch[0])``) of the round's batches in order, the same on every rank (the
    last round may be shorter), and this rank's ``(index, batch)`` or None. Every rank must consume the same
    rounds (a collective per round). One process: one batch per round, no communication.
    """
    ctx = ctx or current()
    batches = iter(shard_batches(loader, ctx))
    while True:
        mine = next(batches, None)
        size = len(mine[1][0]) if mine is not None else -1  # -1: no batch left (0 is a real, empty batch)
        if ctx.world == 1:
            sizes = [size]
        else:
            sizes = [int(s[0]) for s in ctx._all_gather_fixed(torch.tensor([size], dtype=torch.int64))]
        sizes = sizes[:sizes.index(-1)] if -1 in sizes else sizes  # batch i is on rank i mod N: gaps only at the end
        if not sizes:
            return
        yield sizes, mine


def under_torchrun() -> bool:
    """True inside a process started by torchrun (or any launcher that sets WORLD_SIZE and RANK)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def resolve_device(choice: str, local_rank: int = 0, key: str = "distill.device") -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ClipPruneError(f"{key} is cuda but no CUDA device is available")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def timeout_s() -> float:
    """The process group's timeout: ``CLIPPRUNE_DIST_TIMEOUT_S`` seconds, 1800 by default."""
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise ClipPruneError(f"{TIMEOUT_ENV} must be a positive number of seconds, got {raw!r}")
    return value


def init_distributed(device_choice: str = "auto", key: str = "distill.device") -> DistContext:
    """Join the process group when launched by torchrun (nccl on a GPU, gloo otherwise, with ``timeout_s()``);
    otherwise a single-process context. ``key`` names the parameter ``device_choice`` came from."""
    if not under_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return DistContext(device=resolve_device(device_choice, key=key))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    device = resolve_device(device_choice, local_rank, key)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                         timeout=timedelta(seconds=timeout_s()))
    return DistContext(rank=rank, world=world, local_rank=local_rank, device=device, initialised=True)


def torchrun_command(script: str, nproc: int, args: Sequence[str] = ()) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc_per_node N script args``."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            script, *args]


def torchrun_env(nproc: int) -> dict:
    """The environment of the workers: this one, with the CPU threads split between the processes."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return env
