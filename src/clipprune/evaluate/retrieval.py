"""Image–text retrieval with the definitions of LAION's CLIP_benchmark.

Every caption of every image is a query. ``image_retrieval_recall@k`` (text → image): the share of
captions whose own image is among the k images most similar to it. ``text_retrieval_recall@k``
(image → text): the share of images with at least one of their captions among the k most similar
captions. Similarity is the cosine of L2-normalised features.

Ties are broken deterministically: among equal scores the candidate with the lower index ranks first
(as a stable descending sort would order them). ``k`` larger than the number of candidates is clipped.
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from clipprune.distributed import DistContext, current, shard_batches
from clipprune.errors import DataError, ParamError
from clipprune.evaluate.zeroshot import encode_texts, model_device
from clipprune.models.base import ClipModel
from clipprune.progress import progress_bar


def _rank_of(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """0-based rank of column ``target[r]`` in each row of ``scores`` (descending, lower index wins ties)."""
    positive = scores.gather(1, target[:, None])
    columns = torch.arange(scores.shape[1], device=scores.device)
    ahead = (scores > positive) | ((scores == positive) & (columns[None, :] < target[:, None]))
    return ahead.sum(dim=1)


def _check_ks(ks: Sequence[int]) -> list[int]:
    ks = list(ks)
    if not ks or any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in ks):
        raise ParamError(f"ks must be a non-empty list of positive integers, got {ks}")
    return ks


@torch.no_grad()
def retrieval_metrics(image_features: torch.Tensor, text_features: torch.Tensor,
                      text_to_image_index: Sequence[int] | torch.Tensor, ks: Sequence[int] = (1, 5, 10),
                      chunk_size: int = 1024) -> dict[str, float]:
    """Recall@k in both directions from features (n_images, D), (n_texts, D) and each text's image index.

    Returns ``{"image_retrieval_recall@k": ..., "text_retrieval_recall@k": ...}`` for each k (fractions
    in [0, 1]). Scores are computed ``chunk_size`` queries at a time to bound memory.
    """
    ks = _check_ks(ks)
    image_features = F.normalize(torch.as_tensor(image_features).float(), dim=-1)
    text_features = F.normalize(torch.as_tensor(text_features).float(), dim=-1)
    owner = torch.as_tensor(text_to_image_index, dtype=torch.long, device=text_features.device).view(-1)
    n_images, n_texts = image_features.shape[0], text_features.shape[0]
    if n_images == 0 or n_texts == 0:
        raise DataError(f"retrieval needs images and captions, got {n_images} images and {n_texts} captions")
    if image_features.shape[1] != text_features.shape[1]:
        raise DataError(f"image features have width {image_features.shape[1]} but text features "
                        f"{text_features.shape[1]}")
    if owner.numel() != n_texts:
        raise DataError(f"text_to_image_index has {owner.numel()} entries, expected one per caption ({n_texts})")
    if owner.min() < 0 or owner.max() >= n_images:
        raise DataError(f"text_to_image_index must lie in [0, {n_images}), got range "
                        f"[{int(owner.min())}, {int(owner.max())}]")
    captions_per_image = torch.bincount(owner, minlength=n_images)
    if (captions_per_image == 0).any():
        missing = int(torch.nonzero(captions_per_image == 0)[0])
        raise DataError(f"image {missing} has no caption in text_to_image_index")

    # text -> image: rank of each caption's own image
    text_ranks = torch.cat([
        _rank_of(text_features[s:s + chunk_size] @ image_features.T, owner[s:s + chunk_size])
        for s in range(0, n_texts, chunk_size)])

    # image -> text: rank of the best-placed caption of each image, i.e. the caption with the highest
    # score, lowest index among equals (argmax returns the first maximum)
    image_ranks = []
    for s in range(0, n_images, chunk_size):
        scores = image_features[s:s + chunk_size] @ text_features.T
        image_ids = torch.arange(s, s + scores.shape[0], device=scores.device)
        is_positive = owner[None, :] == image_ids[:, None]
        best_caption = scores.masked_fill(~is_positive, float("-inf")).argmax(dim=1)
        image_ranks.append(_rank_of(scores, best_caption))
    image_ranks = torch.cat(image_ranks)

    metrics = {}
    for k in ks:
        metrics[f"image_retrieval_recall@{k}"] = (text_ranks < k).float().mean().item()
        metrics[f"text_retrieval_recall@{k}"] = (image_ranks < k).float().mean().item()
    return metrics


def _iter_batches(dataset: Iterable, batch_size: int):
    """Yield ``(images, list of caption lists)`` batches from single items or already-batched items."""
    images, captions = [], []
    for item in dataset:
        try:
            image, texts = item[0], item[1]
        except (TypeError, IndexError, KeyError):
            raise DataError("retrieval dataset must yield (image, captions) pairs") from None
        if isinstance(texts, (list, tuple)) and texts and not isinstance(texts[0], str):
            # a batch: images (n, ...) with one caption list per image
            if len(texts) != len(image):
                raise DataError(f"retrieval batch has {len(image)} images but {len(texts)} caption lists")
            yield image, [[t] if isinstance(t, str) else list(t) for t in texts]
            continue
        images.append(image)
        captions.append([texts] if isinstance(texts, str) else list(texts))
        if len(images) == batch_size:
            yield images, captions
            images, captions = [], []
    if images:
        yield images, captions


def _sharded_batches(dataset: Iterable, batch_size: int, ctx: DistContext):
    """``(batch index, (images, caption lists))`` of this rank's batches (all of them in one process)."""
    if ctx.world > 1 and isinstance(dataset, DataLoader):  # only this rank's images are read
        return ((index, next(_iter_batches([batch], batch_size))) for index, batch in shard_batches(dataset, ctx))
    return shard_batches(_iter_batches(dataset, batch_size), ctx)


@torch.no_grad()
def evaluate_retrieval(model: ClipModel, dataset: Iterable, batch_size: int = 64, ks: Sequence[int] = (1, 5, 10),
                       progress: bool = True, desc: str = "retrieval",
                       encode_captions: Callable[[list[str]], torch.Tensor] | None = None) -> dict[str, float]:
    """Encode every image and all of its captions from ``dataset`` and return :func:`retrieval_metrics`.

    ``dataset`` yields ``(image, captions)``: an image tensor (3, H, W) already preprocessed or a PIL image
    (``model.preprocess`` is applied), and a list of caption strings; or batches ``(images (n, 3, H, W),
    list of n caption lists)``. ``encode_captions`` maps the list of all captions (dataset order) to their
    embeddings (default: encode them with ``model``; an ``embeddings.TextEncoder`` may reuse them). ``desc``
    labels the progress bars (``"<desc> images"``, ``"<desc> captions"``).
    """
    device = model_device(model)
    ctx = current()
    image_features, caption_batches, captions, owner = [], [], [], []
    n_images = 0
    for index, (images, caption_lists) in progress_bar(_sharded_batches(dataset, batch_size, ctx),
                                                       desc=f"{desc} images", enabled=progress, leave=False):
        if not isinstance(images, torch.Tensor):
            images = torch.stack([im if isinstance(im, torch.Tensor) else model.preprocess(im) for im in images])
        image_features.append(model.encode_image(images.to(device)).float().cpu())
        if any(not texts for texts in caption_lists) and ctx.world > 1:
            raise DataError(f"retrieval image in batch {index} has no caption")
        caption_batches.append(caption_lists)
    # data parallel: every rank gets every batch's image features and captions, in the original order
    image_features, caption_batches = ctx.gather_batches(image_features), ctx.gather_json(caption_batches)
    for caption_lists in caption_batches:
        for texts in caption_lists:
            if not texts:
                raise DataError(f"retrieval image {n_images} has no caption")
            captions.extend(texts)
            owner.extend([n_images] * len(texts))
            n_images += 1
    if not image_features:
        raise DataError("retrieval dataset yielded no images")
    if encode_captions is None:
        text_features = encode_texts(model, captions, batch_size, progress, f"{desc} captions")
    else:
        text_features = encode_captions(captions)
    return retrieval_metrics(torch.cat(image_features), text_features, owner, ks)
