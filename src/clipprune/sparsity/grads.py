"""Per-sample weight gradients of the Linear layers, streamed batch by batch from the calibration data.

One forward/backward per batch of the *summed* batch loss (batch size × the mean loss of
``scoring/losses.py``). For a Linear ``y = x Wᵀ + b`` the gradient is ``Σ_{samples, tokens} δ xᵀ``; keeping
the sum over tokens per sample gives one row per sample, sample ``s``'s gradient through its own
activations (``Σ_t δ_{s,t} x_{s,t}ᵀ``). The rows of a batch sum to the batch gradient. Hooks capture ``x``
and ``δ``; the model's parameters stay frozen except the hooked weights, whose ``.grad`` is never written
(``torch.autograd.grad``).

No layer is ever given a made-up gradient: a layer whose hook did not fire in a batch (its module was
bypassed, e.g. a fused kernel reading ``.weight`` directly) or whose output did not reach the loss stops
the run with an error naming the layer and the batch, and so does a layer whose gradient is identically
zero over the whole calibration set (its Fisher would be ``damp·I``: CAP would prune it as if its weights
cost nothing). Layers that cannot reach the loss by construction (the text tower under an images-only
loss) are refused up front by ``check_loss_for_towers``.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, Mapping

import torch
from torch import nn

from clipprune.distributed import DistContext, current, shard_rounds
from clipprune.errors import ClipPruneError, DataError, ParamError
from clipprune.models.base import ClipModel
from clipprune.progress import progress_bar
from clipprune.scoring.fisher import frozen_parameters
from clipprune.scoring.losses import LOSSES, check_loss_options, get_loss


def check_loss_for_towers(loss: str, towers: Iterable[str]) -> None:
    """ParamError naming sparsity.loss / sparsity.towers when the loss gives the text tower no gradient."""
    get_loss_checked(loss)
    if "text" in towers and not get_loss(loss).uses_text:
        raise ParamError(f"sparsity.towers includes text, but sparsity.loss={loss} uses images only (text "
                         f"gradients would be zero); use sparsity.towers: vision or sparsity.loss: contrastive")


def get_loss_checked(loss: str):
    return LOSSES.get(loss, key="sparsity.loss")


def _per_sample(x: torch.Tensor, delta: torch.Tensor, batch: int) -> torch.Tensor:
    """``[batch, out, in]`` from a Linear's input ``x`` and output gradient ``δ`` (batch first or second)."""
    if x.dim() == 2:
        return torch.einsum("bo,bi->boi", delta, x)
    if x.shape[0] != batch and x.shape[1] == batch:  # sequence-first layout
        x, delta = x.transpose(0, 1), delta.transpose(0, 1)
    x = x.reshape(batch, -1, x.shape[-1])
    delta = delta.reshape(batch, -1, delta.shape[-1])
    return torch.einsum("bto,bti->boi", delta, x)


class _LazyGrads(Mapping):
    """``{layer: [rows, out, in]}`` computed from the captured activations on access, so that a consumer
    working layer by layer holds one layer's per-sample gradients at a time, not the whole model's.

    Every layer is in ``store`` (``per_sample_gradients`` checks it before yielding). ``accessed`` and
    ``nonzero`` (shared by the batches of one pass) collect the layers read, and those with any non-zero
    row, for the whole-set zero-gradient check.

    Data parallel: the batch was computed by rank ``owner`` alone (``store`` is None on the others); reading a
    layer broadcasts its rows from the owner, so every rank must read the same layers in the same order (the
    sparsity methods are deterministic and run on every rank).
    """

    def __init__(self, layers, store: dict | None, batch: int, keep: int, accessed: set, nonzero: set,
                 owner: int = 0, ctx: DistContext | None = None):
        self._layers, self._store, self._batch, self._keep = layers, store, batch, keep
        self._accessed, self._nonzero = accessed, nonzero
        self._owner, self._ctx = owner, ctx or DistContext()

    def __getitem__(self, name: str) -> torch.Tensor:
        if self._store is not None:
            x, delta = self._store[name]
            rows = _per_sample(x, delta, self._batch)[:self._keep].to("cpu", torch.float32)
        else:
            rows = torch.empty(self._keep, *self._layers[name].weight.shape, dtype=torch.float32)
        rows = self._ctx.broadcast(rows, src=self._owner)
        self._accessed.add(name)
        if name not in self._nonzero and bool(rows.any()):
            self._nonzero.add(name)
        return rows

    def __iter__(self):
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)


@contextlib.contextmanager
def _capture(layers: Mapping[str, nn.Linear], store: dict, ran: set):
    """Forward hooks on ``layers``: ``ran`` gets each layer that was called, ``store[name] = (x, δ)`` is
    filled once its output's gradient arrives (a layer whose output does not require grad gets none)."""
    handles = []

    def make_hook(name):
        def hook(module, args, output):
            ran.add(name)
            if not output.requires_grad:  # cut off from the weights' graph: no δ will ever arrive
                return
            x = args[0].detach()

            def grad_hook(delta):
                store[name] = (x, delta.detach())

            output.register_hook(grad_hook)

        return hook

    try:
        for name, layer in layers.items():
            handles.append(layer.register_forward_hook(make_hook(name)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _check_captured(names, ran: set, store: dict, index: int, loss: str) -> None:
    """ClipPruneError naming the first layer of ``names`` whose gradient was not captured in batch ``index``."""
    for name in names:
        if name not in ran:
            raise ClipPruneError(f"sparsity: layer {name} was never called in calibration batch {index} (the "
                                 f"model bypasses this module's forward, e.g. a fused kernel reading its weight), "
                                 f"so its per-sample gradient cannot be captured")
        if name not in store:
            raise ClipPruneError(f"sparsity: layer {name} ran in calibration batch {index} but its output does "
                                 f"not reach sparsity.loss={loss} (no gradient arrived at it)")


def _check_nonzero(names, accessed: set, nonzero: set, samples: int, loss: str) -> None:
    """ClipPruneError for a layer whose gradient rows, as read by the consumer, were all zero over the whole
    calibration set (a layer the consumer never read is not judged)."""
    for name in names:
        if name in accessed and name not in nonzero:
            raise ClipPruneError(f"sparsity: layer {name} has an identically zero gradient on all {samples} "
                                 f"calibration samples (sparsity.loss={loss} does not depend on it); its Fisher "
                                 f"would be damp*I and CAP would prune it as if its weights cost nothing")


def count_samples(loader) -> int | None:
    """Samples a loader yields: its dataset's length, or for a list of (images, captions) batches their sum."""
    try:
        return len(loader.dataset)
    except (AttributeError, TypeError):
        pass
    if isinstance(loader, (list, tuple)):
        return sum(len(batch[0]) for batch in loader)
    return None


def per_sample_gradients(model: ClipModel, loader, layers: Mapping[str, nn.Linear], *, loss: str,
                         num_grads: int, loss_options: Mapping | None = None, progress: bool = True,
                         desc: str = "sparsity grads") -> Iterator[dict[str, torch.Tensor]]:
    """Yield, per batch, ``{layer name: [rows, out, in]}`` float32 per-sample gradients of ``layers``.

    Stops after ``num_grads`` rows in all (the last batch is cut); the data order is the loader's. Under an
    active ``clipprune.distributed.data_parallel`` context with several processes, batch ``i`` is computed by
    rank ``i mod N`` and every rank yields every batch, in the same order (``shard_rounds``, ``_LazyGrads``):
    what a consumer sums over batches is the same floats as in one process.
    """
    loss_fn = get_loss_checked(loss)
    check_loss_options(loss, dict(loss_options or {}))
    check_loss_for_towers(loss, {name.partition(".")[0] for name in layers})
    device = next(model.parameters()).device
    names = list(layers)
    ctx = current()
    seen = 0
    accessed: set = set()
    nonzero: set = set()
    total = count_samples(loader)

    def forward_backward(index: int, images, captions) -> dict:
        """``{layer: (x, δ)}`` of one batch."""
        if not isinstance(images, torch.Tensor):
            raise DataError(f"sparsity: batch {index} holds {type(images).__name__} images, expected a "
                            f"tensor (build the dataset with the model's preprocess transform)")
        batch = images.shape[0]
        if loss_fn.min_batch > batch:
            raise ParamError(f"sparsity.batch_size: a batch of {batch} is too small for "
                             f"sparsity.loss={loss} (needs {loss_fn.min_batch})")
        images = images.to(device)
        store: dict = {}
        ran: set = set()
        with _capture(layers, store, ran):
            image_features = model.encode_image(images)
            text_features = None
            if loss_fn.uses_text:
                tokens = captions if isinstance(captions, torch.Tensor) else model.tokenizer(list(captions))
                text_features = model.encode_text(tokens.to(device))
            value = loss_fn(image_features, text_features, model.logit_scale.detach(), **dict(loss_options or {}))
            if not torch.isfinite(value):
                raise ClipPruneError(f"sparsity: non-finite loss in calibration batch {index}")
            torch.autograd.grad(value * batch, weights, allow_unused=True)
        _check_captured(names, ran, store, index, loss)
        return store

    with frozen_parameters(model):
        weights = [layers[n].weight for n in names]
        for w in weights:
            w.requires_grad_(True)
        bar = progress_bar(total=min(num_grads, total) if total else num_grads, desc=desc, unit="grad",
                           enabled=progress and ctx.is_main)
        try:
            # data parallel: each rank computes one batch of the round, the rows reach every rank in batch order
            for sizes, mine in shard_rounds(loader, ctx):
                if seen >= num_grads:
                    break
                store = forward_backward(mine[0], *mine[1]) if mine is not None else None
                for owner, batch in enumerate(sizes):
                    keep = min(batch, num_grads - seen)
                    if keep <= 0:
                        break
                    out = _LazyGrads(layers, store if owner == ctx.rank else None, batch, keep, accessed, nonzero,
                                     owner, ctx)
                    seen += keep
                    bar.update(keep)
                    yield out
        finally:
            bar.close()
            for w in weights:
                w.requires_grad_(False)  # frozen_parameters restores the original flags afterwards
    if seen == 0:
        raise DataError("sparsity: the calibration data yielded no batches")
    _check_nonzero(names, accessed, nonzero, seen, loss)
