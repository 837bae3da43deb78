"""Retrieval recall@k on hand-made features, plus a brute-force cross-check."""
import pytest
import torch
from torch import nn

from clipprune.errors import DataError, ParamError
from clipprune.evaluate.retrieval import evaluate_retrieval, retrieval_metrics
from clipprune.models.base import ClipModel

# Images are e_0, e_1, e_2, so text t scores image i by TEXTS[t][i]; every row is unit-norm.
IMAGES = torch.eye(3)
TEXTS = torch.tensor([
    [0.8, 0.6, 0.0],  # t0 -> image 0: rank 0
    [0.6, 0.8, 0.0],  # t1 -> image 0: rank 1
    [0.8, 0.0, 0.6],  # t2 -> image 1: rank 2
    [0.0, 0.6, 0.8],  # t3 -> image 1: rank 1
    [0.6, 0.0, 0.8],  # t4 -> image 2: rank 0
    [0.0, 0.8, 0.6],  # t5 -> image 2: rank 1
])
OWNER = [0, 0, 1, 1, 2, 2]
# image -> text, by columns:
#   image 0: best caption t0 (0.8) ties with t2 (0.8); t0 has the lower index -> rank 0
#   image 1: best caption t3 (0.6); t1, t5 (0.8) ahead, t0 (0.6, lower index) ahead -> rank 3
#   image 2: best caption t4 (0.8) ties with t3 (0.8, lower index) -> rank 1


def test_hand_computed_recalls_differ_by_direction():
    metrics = retrieval_metrics(IMAGES, TEXTS, OWNER, ks=(1, 2, 3, 4))
    assert metrics["image_retrieval_recall@1"] == pytest.approx(2 / 6)
    assert metrics["image_retrieval_recall@2"] == pytest.approx(5 / 6)
    assert metrics["image_retrieval_recall@3"] == pytest.approx(1.0)
    assert metrics["image_retrieval_recall@4"] == pytest.approx(1.0)  # k clipped to 3 images
    assert metrics["text_retrieval_recall@1"] == pytest.approx(1 / 3)
    assert metrics["text_retrieval_recall@2"] == pytest.approx(2 / 3)
    assert metrics["text_retrieval_recall@3"] == pytest.approx(2 / 3)
    assert metrics["text_retrieval_recall@4"] == pytest.approx(1.0)
    assert len(metrics) == 8


def test_scale_and_chunking_do_not_change_results():
    reference = retrieval_metrics(IMAGES, TEXTS, OWNER, ks=(1, 2, 3, 4))
    scaled = retrieval_metrics(IMAGES * 7.0, TEXTS * torch.arange(1, 7)[:, None], OWNER, ks=(1, 2, 3, 4),
                               chunk_size=1)
    assert scaled == reference


def test_exact_ties_resolve_to_the_lower_index():
    images = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # identical images
    texts = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    metrics = retrieval_metrics(images, texts, [0, 1], ks=(1, 2))
    # text -> image: both captions see image 0 first, so only caption 0 hits at k=1
    assert metrics["image_retrieval_recall@1"] == 0.5
    # image -> text: caption 0 first for both images
    assert metrics["text_retrieval_recall@1"] == 0.5
    assert metrics["image_retrieval_recall@2"] == metrics["text_retrieval_recall@2"] == 1.0


def brute_force(images, texts, owner, k):
    images = nn.functional.normalize(images, dim=-1)
    texts = nn.functional.normalize(texts, dim=-1)
    scores = texts @ images.T
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    t2i = sum(owner[t] in order[t].tolist() for t in range(len(owner))) / len(owner)
    order = torch.sort(scores.T, dim=1, descending=True, stable=True).indices[:, :k]
    i2t = sum(any(owner[t] == i for t in order[i].tolist()) for i in range(images.shape[0])) / images.shape[0]
    return t2i, i2t


def test_matches_sorting_reference_on_random_features():
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(40, 8, generator=generator)
    owner = [i for i in range(40) for _ in range(1 + i % 3)]  # 1 to 3 captions per image
    texts = images[owner] + 0.9 * torch.randn(len(owner), 8, generator=generator)
    metrics = retrieval_metrics(images, texts, owner, ks=(1, 5, 10), chunk_size=7)
    for k in (1, 5, 10):
        t2i, i2t = brute_force(images, texts, owner, k)
        assert metrics[f"image_retrieval_recall@{k}"] == pytest.approx(t2i)
        assert metrics[f"text_retrieval_recall@{k}"] == pytest.approx(i2t)
    assert 0 < metrics["image_retrieval_recall@1"] < metrics["image_retrieval_recall@10"] <= 1


def test_bad_inputs_raise():
    with pytest.raises(DataError, match="text_to_image_index"):
        retrieval_metrics(IMAGES, TEXTS, OWNER[:-1])
    with pytest.raises(DataError, match="text_to_image_index"):
        retrieval_metrics(IMAGES, TEXTS, [0, 0, 1, 1, 2, 3])
    with pytest.raises(DataError, match="image 2 has no caption"):
        retrieval_metrics(IMAGES, TEXTS, [0, 0, 1, 1, 1, 1])
    with pytest.raises(ParamError, match="ks"):
        retrieval_metrics(IMAGES, TEXTS, OWNER, ks=(0,))


class CaptionClip(ClipModel):
    """Images are their own features; a caption "t<j>" embeds to TEXTS[j]."""

    family = "fake"
    name = "fake"

    def __init__(self):
        self.module = nn.Linear(1, 1)
        self.towers = {}
        self.tokenizer = lambda texts: torch.tensor([[int(t[1:])] for t in texts])
        self.preprocess = lambda image: torch.as_tensor(image, dtype=torch.float32)

    def encode_image(self, images):
        return images.flatten(1)

    def encode_text(self, tokens):
        return TEXTS[tokens[:, 0]]


def test_evaluate_retrieval_encodes_items_and_batches():
    expected = retrieval_metrics(IMAGES, TEXTS, OWNER, ks=(1, 2))
    items = [(IMAGES[0], ["t0", "t1"]), (IMAGES[1].tolist(), ("t2", "t3")), (IMAGES[2], ["t4", "t5"])]
    assert evaluate_retrieval(CaptionClip(), items, batch_size=2, ks=(1, 2), progress=False) == expected
    batched = [(IMAGES[:2], [["t0", "t1"], ["t2", "t3"]]), (IMAGES[2:], [["t4", "t5"]])]
    assert evaluate_retrieval(CaptionClip(), batched, batch_size=1, ks=(1, 2), progress=False) == expected
    with pytest.raises(DataError, match="no caption"):
        evaluate_retrieval(CaptionClip(), [(IMAGES[0], [])], progress=False)
