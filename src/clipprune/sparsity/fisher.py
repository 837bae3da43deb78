"""Inverse block-diagonal empirical Fisher built from gradients by Sherman–Morrison (CAP / oBERT).

A weight tensor is flattened and cut into blocks of ``B`` consecutive weights (the last block padded). For
each block the inverse of ``damp·I + (1/m) Σ_i g_i g_iᵀ`` is built directly, one gradient at a time:

    F⁻¹ ← F⁻¹ − (F⁻¹ g)(F⁻¹ g)ᵀ / (m + gᵀ F⁻¹ g),   starting from F⁻¹ = I / damp,

vectorised over all blocks of the tensor. Padded positions get zero gradients, so they stay decoupled
(their rows/columns of F⁻¹ remain ``I / damp``) and do not disturb the real weights of the last block.
"""
from __future__ import annotations

import math

import torch


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


class BlockFisherInverse:
    """Running inverse of ``damp·I + (1/m) Σ g gᵀ`` for every block of one weight tensor.

    ``num_grads`` is ``m``, the number of gradients that will be added (it scales each rank-one term).
    """

    def __init__(self, numel: int, block_size: int, damp: float, num_grads: int,
                 dtype: torch.dtype = torch.float32, device="cpu"):
        self.numel, self.block_size, self.damp, self.num_grads = numel, block_size, damp, num_grads
        blocks = num_blocks(numel, block_size)
        eye = torch.eye(block_size, dtype=dtype, device=device) / damp
        self.inverse = eye.expand(blocks, block_size, block_size).contiguous()
        self.seen = 0

    def update(self, grads: torch.Tensor, rank: int | None = None) -> None:
        """Add gradients ``[rows, numel]`` (or ``[rows, *weight shape]``).

        ``rank=1``: one Sherman–Morrison step per gradient. Otherwise ``rank`` gradients at a time (default:
        all rows) by the Woodbury identity, ``F⁻¹ ← F⁻¹ − U (m·I + G U)⁻¹ Uᵀ`` with ``U = F⁻¹ Gᵀ``: in exact
        arithmetic the same as ``rank`` Sherman–Morrison steps, and several times faster on a CPU (matrix
        products instead of matrix-vector products over the whole inverse).
        """
        rows = grads.reshape(grads.shape[0], -1)
        if rows.shape[1] != self.numel:
            raise ValueError(f"gradient rows hold {rows.shape[1]} values, expected {self.numel}")
        if rows.shape[0] == 0:
            return
        blocked = to_blocks(rows.to(self.inverse.dtype), self.block_size).transpose(0, 1)  # [blocks, rows, B]
        rank = rows.shape[0] if rank is None else rank
        for start in range(0, blocked.shape[1], rank):
            g = blocked[:, start:start + rank]  # [blocks, r, B]
            if g.shape[1] == 1:
                u = torch.bmm(self.inverse, g.transpose(1, 2))  # [blocks, B, 1] = F⁻¹ g
                denom = self.num_grads + torch.bmm(g, u)  # [blocks, 1, 1]
                self.inverse.baddbmm_(u, (u / denom).transpose(1, 2), alpha=-1)
                continue
            u = torch.bmm(self.inverse, g.transpose(1, 2))  # [blocks, B, r]
            inner = torch.bmm(g, u)
            inner.diagonal(dim1=1, dim2=2).add_(self.num_grads)  # m·I + G F⁻¹ Gᵀ (SPD)
            solved = torch.cholesky_solve(u.transpose(1, 2), torch.linalg.cholesky(inner))  # [blocks, r, B]
            self.inverse.baddbmm_(u, solved, alpha=-1)
        self.seen += rows.shape[0]

    def memory_bytes(self) -> int:
        return self.inverse.numel() * self.inverse.element_size()


def damped_fisher(grads: torch.Tensor, block_size: int, damp: float) -> torch.Tensor:
    """The damped block Fisher itself, ``damp·I + (1/m) Σ g gᵀ`` per block (for checks; ``[blocks, B, B]``)."""
    rows = grads.reshape(grads.shape[0], -1)
    blocked = to_blocks(rows, block_size)  # [m, blocks, B]
    fisher = torch.einsum("mbi,mbj->bij", blocked, blocked) / rows.shape[0]
    return fisher + damp * torch.eye(block_size, dtype=fisher.dtype)


def fisher_inverse_memory_bytes(numel: int, block_size: int, itemsize: int = 4) -> int:
    """Bytes the block inverses of a tensor of ``numel`` weights take (padding included)."""
    return num_blocks(numel, block_size) * block_size * block_size * itemsize
