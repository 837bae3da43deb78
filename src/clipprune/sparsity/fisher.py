"""The block-diagonal empirical Fisher of CAP / oBERT, kept as Cholesky factors.

A weight tensor is flattened and cut into blocks of ``B`` consecutive weights (the last block padded). Each
block's damped empirical Fisher ``F = damp·I + (1/m) Σ_i g_i g_iᵀ`` is held as its lower Cholesky factor
``L`` (``F = L Lᵀ``), updated batch by batch from the gradients,

    L ← chol(L Lᵀ + (1/m) Gᵀ G),   starting from L = √damp · I,

and OBS works on ``F⁻¹ = cholesky_inverse(L)``, which is the inverse Sherman–Morrison (CAP) builds one
gradient at a time. Padded positions get zero gradients, so they stay decoupled (``1/damp`` on the diagonal
of ``F⁻¹``) and do not disturb the real weights of the last block.

Why a factor and not the inverse: real gradients are strongly low-rank, so with the default ``damp`` (1e-7)
``F`` has condition numbers of 10⁹ and more. Its inverse cannot be held in float32 (the Woodbury update of
an inverse stored in float32 lost positive-definiteness and crashed), while ``L`` has the square root of that
condition number. Every update and every inverse is computed in float64; ``fisher_dtype`` is only the
storage type of ``L`` between batches (float32 halves the memory), and any float32 ``L`` with a nonzero
diagonal still describes a positive-definite Fisher.
"""
from __future__ import annotations

import math

import torch

from clipprune.errors import ParamError

COMPUTE_DTYPE = torch.float64
UPDATE_CHUNK = 2048  # blocks updated together: bounds the float64 temporaries (~40 MB at B = 50)


def num_blocks(numel: int, block_size: int) -> int:
    return math.ceil(numel / block_size)


def to_blocks(flat: torch.Tensor, block_size: int) -> torch.Tensor:
    """``[..., numel]`` -> ``[..., blocks, block_size]``, zero-padded at the end."""
    numel = flat.shape[-1]
    pad = num_blocks(numel, block_size) * block_size - numel
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.reshape(*flat.shape[:-1], -1, block_size)


def from_blocks(blocks: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`to_blocks`: ``[..., blocks, block_size]`` -> ``[..., numel]``."""
    return blocks.reshape(*blocks.shape[:-2], -1)[..., :numel]


def valid_positions(numel: int, block_size: int) -> torch.Tensor:
    """Bool ``[blocks, block_size]``: True where a block position holds a real weight (not padding)."""
    return to_blocks(torch.ones(numel, dtype=torch.bool), block_size)


class BlockFisher:
    """Cholesky factors of ``damp·I + (1/m) Σ g gᵀ`` for every block of one weight tensor.

    ``num_grads`` is ``m``, the number of gradients that will be added (it scales each rank-one term);
    ``dtype`` is the storage type of the factors.
    """

    def __init__(self, numel: int, block_size: int, damp: float, num_grads: int,
                 dtype: torch.dtype = torch.float32, device="cpu"):
        self.numel, self.block_size, self.damp, self.num_grads = numel, block_size, damp, num_grads
        blocks = num_blocks(numel, block_size)
        eye = torch.eye(block_size, dtype=dtype, device=device) * math.sqrt(damp)
        self.factor = eye.expand(blocks, block_size, block_size).contiguous()
        self.seen = 0

    def update(self, grads: torch.Tensor) -> None:
        """Add gradients ``[rows, numel]`` (or ``[rows, *weight shape]``)."""
        rows = grads.reshape(grads.shape[0], -1)
        if rows.shape[1] != self.numel:
            raise ValueError(f"gradient rows hold {rows.shape[1]} values, expected {self.numel}")
        if rows.shape[0] == 0:
            return
        blocked = to_blocks(rows, self.block_size).transpose(0, 1)  # [blocks, rows, B]
        for start in range(0, self.factor.shape[0], UPDATE_CHUNK):
            end = start + UPDATE_CHUNK
            g = blocked[start:end].to(COMPUTE_DTYPE)
            low = self.factor[start:end].to(COMPUTE_DTYPE)
            fisher = torch.bmm(low, low.transpose(1, 2))
            fisher.baddbmm_(g.transpose(1, 2), g, alpha=1.0 / self.num_grads)
            self.factor[start:end] = cholesky(fisher, start).to(self.factor.dtype)
        self.seen += rows.shape[0]

    def inverse(self, start: int = 0, end: int | None = None) -> torch.Tensor:
        """``F⁻¹`` of blocks ``[start, end)`` in float64 (``[blocks, B, B]``, a new tensor)."""
        return block_inverse(self.factor[start:end])

    def memory_bytes(self) -> int:
        return self.factor.numel() * self.factor.element_size()


def cholesky(fisher: torch.Tensor, first_block: int = 0) -> torch.Tensor:
    """Lower Cholesky factors of a batch of damped Fishers (float64). A damped Fisher is positive definite, so
    a failure means the damping is lost in round-off (gradients of ~1/√damp and larger): one line that says
    which block and what to change."""
    low, info = torch.linalg.cholesky_ex(fisher)
    bad = torch.nonzero(info).flatten()
    if bad.numel():
        block = first_block + int(bad[0])
        scale = float(fisher[bad[0]].diagonal().max())
        raise ParamError(f"sparsity.damp is too small for these gradients: the damped Fisher of block {block} is "
                         f"not positive definite in float64 (largest diagonal {scale:.3g}); raise sparsity.damp")
    return low


def block_inverse(factor: torch.Tensor) -> torch.Tensor:
    """``F⁻¹`` (float64) from stored factors ``[blocks, B, B]``."""
    return torch.cholesky_inverse(factor.to(COMPUTE_DTYPE))


def damped_fisher(grads: torch.Tensor, block_size: int, damp: float) -> torch.Tensor:
    """The damped block Fisher itself, ``damp·I + (1/m) Σ g gᵀ`` per block (for checks; ``[blocks, B, B]``)."""
    rows = grads.reshape(grads.shape[0], -1)
    blocked = to_blocks(rows, block_size)  # [m, blocks, B]
    fisher = torch.einsum("mbi,mbj->bij", blocked, blocked) / rows.shape[0]
    return fisher + damp * torch.eye(block_size, dtype=fisher.dtype)


def fisher_memory_bytes(numel: int, block_size: int, itemsize: int = 4) -> int:
    """Bytes the block factors of a tensor of ``numel`` weights take (padding included)."""
    return num_blocks(numel, block_size) * block_size * block_size * itemsize
