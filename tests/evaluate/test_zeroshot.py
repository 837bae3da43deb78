"""Zero-shot classification on a fake CLIP whose encoders are known in closed form."""
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score
from torch import nn

from clipprune.errors import DataError, ParamError
from clipprune.evaluate.zeroshot import build_classifier, classification_metrics, zero_shot_classification
from clipprune.models.base import ClipModel


class LookupTokenizer:
    """Maps each known string to an id; unknown strings fail loudly."""

    def __init__(self, texts):
        self.ids = {t: i for i, t in enumerate(texts)}

    def __call__(self, texts):
        return torch.tensor([[self.ids[t]] for t in texts], dtype=torch.long)


class FakeClip(ClipModel):
    """encode_image is the identity on flat feature vectors; encode_text looks embeddings up by string."""

    family = "fake"
    name = "fake"

    def __init__(self, text_embeddings: dict):
        self.module = nn.Linear(1, 1)  # gives the model a parameter (device)
        self.towers = {}
        self.tokenizer = LookupTokenizer(list(text_embeddings))
        self.table = torch.tensor(list(text_embeddings.values()), dtype=torch.float32)
        self.text_calls = 0

    def encode_image(self, images):
        return images.float().flatten(1)

    def encode_text(self, tokens):
        self.text_calls += 1
        return self.table[tokens[:, 0]]


TEMPLATES = ["a photo of {c}.", "a drawing of {c}."]


def identity_model(n_classes):
    """Class c's prompts embed to multiples of e_c (different norms), so W is the identity."""
    embeddings = {}
    for c in range(n_classes):
        for t, template in enumerate(TEMPLATES):
            embeddings[template.format(c=f"class{c}")] = [float(t + 1) * (i == c) for i in range(n_classes)]
    return FakeClip(embeddings), [f"class{c}" for c in range(n_classes)]


def test_build_classifier_normalises_averages_renormalises():
    model = FakeClip({"a cat": [3.0, 0.0, 0.0], "the cat": [0.0, 4.0, 0.0],
                      "a dog": [0.0, 0.0, 2.0], "the dog": [0.0, 0.0, 5.0]})
    for batch_size in (1, 3, 256):
        weights = build_classifier(model, ["cat", "dog"], ["a {c}", "the {c}"], batch_size, progress=False)
        r = 1 / math.sqrt(2)
        assert weights.shape == (3, 2)
        assert torch.allclose(weights, torch.tensor([[r, 0.0], [r, 0.0], [0.0, 1.0]]), atol=1e-6)
    # without normalising each prompt first, "the cat" (norm 4) would dominate "a cat" (norm 3)
    assert weights[0, 0] == pytest.approx(weights[1, 0])


def test_templates_must_use_c_placeholder():
    model, classes = identity_model(3)
    with pytest.raises(ParamError, match="template"):
        build_classifier(model, classes, ["a photo of a thing."], progress=False)
    with pytest.raises(ParamError, match="template"):
        build_classifier(model, classes, ["{c} and {other}"], progress=False)
    with pytest.raises(ParamError, match="classnames"):
        build_classifier(model, [], TEMPLATES, progress=False)


def batches(features, targets, size):
    features, targets = torch.tensor(features, dtype=torch.float32), torch.tensor(targets)
    return [(features[i:i + size], targets[i:i + size]) for i in range(0, len(targets), size)]


def test_acc1_acc5_mean_per_class_recall_hand_computed():
    model, classes = identity_model(6)
    ranked = [5, 4, 3, 2, 1, 0]          # class 0 first, class 5 last
    onehot = lambda c: [float(i == c) for i in range(6)]
    features = [ranked,       # target 0: rank 0
                ranked,       # target 1: rank 1 -> top-5 only
                onehot(2),    # target 2: rank 0
                ranked,       # target 5: rank 5 -> miss even in top-5
                [0, 0, 0, 0, 7, 0],  # target 4: rank 0 (scale does not matter)
                onehot(1),    # target 0: predicted 1; ties among zeros keep class 0 at rank 1
                onehot(0)]    # target 0: rank 0
    targets = [0, 1, 2, 5, 4, 0, 0]
    metrics = zero_shot_classification(model, batches(features, targets, 2), classes, TEMPLATES,
                                       progress=False)
    assert metrics["acc1"] == pytest.approx(4 / 7)
    assert metrics["acc5"] == pytest.approx(6 / 7)
    # classes present: 0 (2 of 3), 1 (0/1), 2 (1/1), 4 (1/1), 5 (0/1); class 3 never occurs
    assert metrics["mean_per_class_recall"] == pytest.approx((2 / 3 + 0 + 1 + 1 + 0) / 5)
    assert set(metrics) == {"acc1", "acc5", "mean_per_class_recall"}


def test_imbalanced_acc1_differs_from_mean_per_class_recall():
    model, classes = identity_model(3)
    predictions = [0, 0, 0, 0, 2]
    targets = [0, 0, 0, 1, 2]
    features = [[float(i == p) * 2 + 0.1 * (i == 1) for i in range(3)] for p in predictions]
    metrics = zero_shot_classification(model, batches(features, targets, 3), classes, TEMPLATES,
                                       progress=False)
    assert metrics["acc1"] == pytest.approx(0.8)
    assert metrics["mean_per_class_recall"] == pytest.approx((1 + 0 + 1) / 3)
    assert metrics["acc5"] is None  # top-5 of 3 classes is undefined (CLIP_benchmark: NaN)


def test_precomputed_classifier_skips_text_encoding():
    model, classes = identity_model(3)
    weights = build_classifier(model, classes, TEMPLATES, progress=False)
    calls = model.text_calls
    metrics = zero_shot_classification(model, batches([[1.0, 0, 0]], [0], 1), classes, TEMPLATES,
                                       classifier=weights, progress=False)
    assert model.text_calls == calls and metrics["acc1"] == 1.0


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_mean_per_class_recall_matches_balanced_accuracy():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 7, generator=generator)
    targets = torch.randint(0, 6, (200,), generator=generator)  # class 6 never a target
    metrics = classification_metrics(logits, targets)
    predictions = logits.argmax(dim=1).numpy()
    expected = balanced_accuracy_score(targets.numpy(), predictions)
    assert metrics["mean_per_class_recall"] == pytest.approx(expected)
    assert metrics["acc1"] == pytest.approx(float(np.mean(predictions == targets.numpy())))
    top5 = torch.topk(logits, 5).indices
    assert metrics["acc5"] == pytest.approx((top5 == targets[:, None]).any(1).float().mean().item())


def test_bad_inputs_raise_data_errors():
    model, classes = identity_model(3)
    with pytest.raises(DataError, match="no batches"):
        zero_shot_classification(model, [], classes, TEMPLATES, progress=False)
    with pytest.raises(DataError, match="targets"):
        zero_shot_classification(model, batches([[1.0, 0, 0]], [3], 1), classes, TEMPLATES, progress=False)


def test_topk_above_the_class_count_is_null_like_clip_benchmark():
    """CLIP_benchmark 1.6.2 computes acc5 only with >= 5 classes (NaN otherwise); here every k > classes is None."""
    generator = torch.Generator().manual_seed(3)
    for n_classes in (1, 3, 4, 5, 6):
        logits = torch.randn(40, n_classes, generator=generator)
        targets = torch.randint(0, n_classes, (40,), generator=generator)
        metrics = classification_metrics(logits, targets, ks=(1, 2, 5, 10))
        ranks = (logits > logits.gather(1, targets[:, None])).sum(1)  # brute force: classes scored above
        for k in (1, 2, 5, 10):
            if k > n_classes:
                assert metrics[f"acc{k}"] is None, (n_classes, k)
            else:
                assert metrics[f"acc{k}"] == pytest.approx((ranks < k).float().mean().item()), (n_classes, k)
    assert classification_metrics(torch.randn(4, 5, generator=generator), torch.arange(4))["acc5"] == 1.0


def test_three_class_zero_shot_set_reports_acc5_null_and_json_has_no_nan():
    import json

    model, classes = identity_model(3)
    metrics = zero_shot_classification(model, batches([[1.0, 0, 0], [0, 0, 2.0]], [0, 2], 2), classes, TEMPLATES,
                                       progress=False)
    assert metrics == {"acc1": 1.0, "acc5": None, "mean_per_class_recall": 1.0}
    assert json.dumps(metrics, allow_nan=False) == '{"acc1": 1.0, "acc5": null, "mean_per_class_recall": 1.0}'


def test_bad_ks_are_param_errors():
    with pytest.raises(ParamError, match="ks must be"):
        classification_metrics(torch.zeros(2, 3), torch.tensor([0, 1]), ks=(0,))


def test_progress_bars_are_labelled(capsys):
    model, classes = identity_model(3)
    zero_shot_classification(model, batches([[1.0, 0, 0]], [0], 1), classes, TEMPLATES, desc="tuned masks zero-shot")
    err = capsys.readouterr().err
    assert "tuned masks zero-shot classifier" in err and "tuned masks zero-shot:" in err
