"""Zero-shot classification with the definitions of LAION's CLIP_benchmark.

Classifier: for each class, encode every prompt template filled with the class name, L2-normalise each
embedding, average, and renormalise; the columns of ``W`` (embed_dim × n_classes) are these class
embeddings. Logits are ``100 · normalize(image_features) @ W``. Reported: top-1 and top-5 accuracy and
the mean over classes of per-class recall (classes that occur in the targets; this is scikit-learn's
balanced accuracy). Top-k with k above the number of classes is undefined: CLIP_benchmark 1.6.2 reports
NaN for acc5 with fewer than 5 classes; JSON has no NaN, so such an ``acc{k}`` is ``None`` (``null``).
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence, Union

import torch
import torch.nn.functional as F

from clipprune.distributed import current, shard_batches
from clipprune.errors import DataError, ParamError
from clipprune.models.base import ClipModel
from clipprune.progress import progress_bar

Template = Union[str, Callable[[str], str]]


def model_device(model: ClipModel) -> torch.device:
    """Device of the model's first parameter or buffer (CPU when it has none)."""
    for tensor in model.module.parameters():
        return tensor.device
    for tensor in model.module.buffers():
        return tensor.device
    return torch.device("cpu")


def fill_template(template: Template, classname: str) -> str:
    """``template.format(c=classname)``; callables are called with the class name."""
    if callable(template):
        return template(classname)
    if "{c}" not in template:
        raise ParamError(f"prompt template {template!r} must contain the placeholder '{{c}}'")
    try:
        return template.format(c=classname)
    except (KeyError, IndexError, ValueError) as err:
        raise ParamError(f"prompt template {template!r} must use only the placeholder '{{c}}' ({err})") from None


def tokenize_texts(model: ClipModel, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """Token ids of ``texts`` (n, context_length) on CPU, tokenized ``batch_size`` at a time."""
    chunks = [model.tokenizer(list(texts[start:start + batch_size])).cpu()
              for start in range(0, len(texts), batch_size)]
    return torch.cat(chunks) if chunks else torch.empty(0, 0, dtype=torch.long)


@torch.no_grad()
def encode_tokens(model: ClipModel, tokens: torch.Tensor, batch_size: int = 256, progress: bool = False,
                  desc: str = "encode text") -> torch.Tensor:
    """Text embeddings (not normalised) of token ids (n, context_length), in batches, (n, embed_dim), on CPU."""
    device = model_device(model)
    ctx = current()  # data parallel: batch i on rank i mod N, gathered in order
    chunks = []
    starts = range(0, tokens.shape[0], batch_size)
    for _, start in progress_bar(shard_batches(starts, ctx), desc=desc, enabled=progress, leave=False):
        chunks.append(model.encode_text(tokens[start:start + batch_size].to(device)).float().cpu())
    chunks = ctx.gather_batches(chunks)
    return torch.cat(chunks) if chunks else torch.empty(0, 0)


def encode_texts(model: ClipModel, texts: Sequence[str], batch_size: int = 256,
                 progress: bool = False, desc: str = "encode text") -> torch.Tensor:
    """Text embeddings (not normalised) of ``texts``, in batches, shape (len(texts), embed_dim), on CPU."""
    return encode_tokens(model, tokenize_texts(model, texts, batch_size), batch_size, progress, desc)


def prompt_texts(classnames: Sequence[str], templates: Sequence[Template]) -> list[str]:
    """Every template filled with every class name, class by class (the classifier's prompt order)."""
    classnames, templates = list(classnames), list(templates)
    if not classnames:
        raise ParamError("classnames must be a non-empty list of class names")
    if not templates:
        raise ParamError("templates must be a non-empty list of prompt templates containing '{c}'")
    return [fill_template(t, c) for c in classnames for t in templates]


def classifier_from_embeddings(embeddings: torch.Tensor, n_classes: int, n_templates: int) -> torch.Tensor:
    """Zero-shot weights (embed_dim, n_classes) from the prompt embeddings in :func:`prompt_texts` order.

    Each class embedding is the renormalised mean of the normalised embeddings of all its prompts.
    """
    embeddings = F.normalize(embeddings.float(), dim=-1)
    class_embeddings = embeddings.view(n_classes, n_templates, -1).mean(dim=1)
    return F.normalize(class_embeddings, dim=-1).T.contiguous()


@torch.no_grad()
def build_classifier(model: ClipModel, classnames: Sequence[str], templates: Sequence[Template],
                     batch_size: int = 256, progress: bool = True,
                     desc: str = "zero-shot classifier") -> torch.Tensor:
    """Zero-shot weights, shape (embed_dim, n_classes), each column unit-norm (float32, on the model's device).

    Each class embedding is the renormalised mean of the normalised embeddings of all its prompts.
    """
    texts = prompt_texts(classnames, templates)
    embeddings = encode_texts(model, texts, batch_size, progress, desc)
    weights = classifier_from_embeddings(embeddings, len(list(classnames)), len(list(templates)))
    return weights.to(model_device(model))


def topk_predictions(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest logits per row; ties go to the lower class index (stable sort)."""
    k = min(k, logits.shape[1])
    return torch.sort(logits, dim=1, descending=True, stable=True).indices[:, :k]


def classification_metrics(logits: torch.Tensor, targets: torch.Tensor, n_classes: int | None = None,
                           ks: Sequence[int] = (1, 5)) -> dict:
    """``acc{k}`` for each k in ``ks`` and mean per-class recall from logits (n, n_classes) and targets (n,).

    ``acc{k}`` is ``None`` when k exceeds the number of classes (undefined; CLIP_benchmark reports NaN).
    """
    if logits.shape[0] == 0:
        raise DataError("zero-shot evaluation got no samples")
    n_classes = logits.shape[1] if n_classes is None else n_classes
    targets = targets.long().view(-1)
    if targets.min() < 0 or targets.max() >= n_classes:
        raise DataError(f"zero-shot targets must lie in [0, {n_classes}), got range "
                        f"[{int(targets.min())}, {int(targets.max())}]")
    ks = list(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ParamError(f"ks must be a non-empty list of positive integers, got {ks}")
    top = topk_predictions(logits, max(ks))
    hits = top == targets[:, None]
    accuracy = {f"acc{k}": None if k > n_classes else hits[:, :k].any(dim=1).float().mean().item() for k in ks}
    # per-class recall over the classes present in the targets (balanced accuracy)
    correct = hits[:, 0].float()
    per_class_total = torch.bincount(targets, minlength=n_classes).float()
    per_class_correct = torch.bincount(targets, weights=correct, minlength=n_classes)
    present = per_class_total > 0
    mean_recall = (per_class_correct[present] / per_class_total[present]).mean().item()
    return {**accuracy, "mean_per_class_recall": mean_recall}


@torch.no_grad()
def zero_shot_classification(model: ClipModel, dataloader: Iterable, classnames: Sequence[str],
                             templates: Sequence[Template], batch_size: int = 256,
                             classifier: torch.Tensor | None = None, progress: bool = True,
                             desc: str = "zero-shot") -> dict:
    """Zero-shot top-1 / top-5 accuracy and mean per-class recall on ``dataloader``.

    ``dataloader`` yields ``(images, targets)`` batches of preprocessed image tensors (n, 3, H, W) and
    class indices (n,). ``batch_size`` is for encoding the prompts. A precomputed ``classifier``
    (from :func:`build_classifier`) may be passed to skip encoding the prompts again. ``desc`` labels the
    progress bars (images; ``"<desc> classifier"`` for the prompts).
    """
    weights = classifier if classifier is not None else build_classifier(
        model, classnames, templates, batch_size, progress, f"{desc} classifier")
    device = model_device(model)
    weights = weights.to(device=device, dtype=torch.float32)
    ctx = current()  # data parallel: batch i on rank i mod N, gathered in order
    all_logits, all_targets = [], []
    for _, batch in progress_bar(shard_batches(dataloader, ctx), desc=desc, enabled=progress, leave=False):
        try:
            images, targets = batch[0], batch[1]
        except (TypeError, IndexError, KeyError):
            raise DataError("zero-shot dataloader must yield (images, targets) batches") from None
        features = F.normalize(model.encode_image(images.to(device)).float(), dim=-1)
        all_logits.append((100.0 * features @ weights).cpu())
        all_targets.append(torch.as_tensor(targets).view(-1).cpu().long())
    all_logits, all_targets = ctx.gather_batches(all_logits), ctx.gather_batches(all_targets)
    if not all_logits:
        raise DataError("zero-shot dataloader yielded no batches")
    return classification_metrics(torch.cat(all_logits), torch.cat(all_targets), weights.shape[1])
