"""Batch losses: contrastive against open_clip's ClipLoss, entropy against a hand computation."""
import math

import pytest
import torch

from clipprune.errors import ParamError
from clipprune.scoring import available_losses, get_loss
from clipprune.scoring.losses import check_loss_options


def features(batch=5, dim=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, dim, generator=gen) * 3, torch.randn(batch, dim, generator=gen)


def test_builtin_losses():
    assert {"contrastive", "entropy"} <= set(available_losses())
    assert available_losses() == sorted(available_losses())
    assert get_loss("contrastive").uses_text and not get_loss("entropy").uses_text
    assert get_loss("entropy").min_batch == 2


def test_contrastive_equals_open_clip_clip_loss():
    from open_clip.loss import ClipLoss

    image, text = features()
    scale = torch.tensor(14.3)
    ours = get_loss("contrastive")(image, text, scale)
    # ClipLoss takes normalised features; ours normalises inside
    reference = ClipLoss()(torch.nn.functional.normalize(image, dim=-1),
                           torch.nn.functional.normalize(text, dim=-1), scale)
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=1e-6)
    # positives are on the diagonal: a shuffled caption order gives a higher loss
    assert get_loss("contrastive")(image, image.clone(), scale) < get_loss("contrastive")(image, image.flip(0), scale)


def test_entropy_by_hand():
    # three unit vectors in the plane at 0, 90 and 180 degrees: cosines are known exactly
    image = torch.tensor([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0]])
    scale = 2.0
    cos = [[1, 0, -1], [0, 1, 0], [-1, 0, 1]]
    expected = 0.0
    for i in range(3):
        others = [scale * cos[i][j] for j in range(3) if j != i]
        z = sum(math.exp(v) for v in others)
        expected += -sum(math.exp(v) / z * (v - math.log(z)) for v in others)
    expected /= 3
    value = get_loss("entropy")(image, None, torch.tensor(100.0), inv_temperature=scale)
    assert value.item() == pytest.approx(expected, abs=1e-6)
    # the default temperature is the logit scale passed in
    assert get_loss("entropy")(image, None, scale).item() == pytest.approx(expected, abs=1e-6)
    # with two images each row has a single candidate left: entropy 0
    assert get_loss("entropy")(image[:2], None, scale).item() == pytest.approx(0.0, abs=1e-6)
    # closed form: image 1 is equally similar to the others (entropy log 2); images 0 and 2 each see
    # logits 0 and -scale (binary entropy)
    p = 1 / (1 + math.exp(-scale))
    assert expected == pytest.approx((math.log(2) - 2 * (p * math.log(p) + (1 - p) * math.log(1 - p))) / 3)


def test_entropy_gradient_is_finite_despite_the_excluded_diagonal():
    image, _ = features(batch=4)
    image.requires_grad_(True)
    value = get_loss("entropy")(image, None, 20.0)
    (grad,) = torch.autograd.grad(value, image)
    assert torch.isfinite(value) and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_loss_errors():
    with pytest.raises(ParamError, match=r"^score\.loss must be one of contrastive, entropy(, [a-z_]+)*; got 'infonce'$"):
        get_loss("infonce")
    image, text = features()
    with pytest.raises(ParamError, match=r"score\.options: unknown option\(s\) temperature for loss 'entropy'"):
        get_loss("entropy")(image, None, 10.0, temperature=0.05)
    with pytest.raises(ParamError, match="unknown option"):
        check_loss_options("contrastive", {"inv_temperature": 10})
    with pytest.raises(ParamError, match="at least 2 images per batch"):
        get_loss("entropy")(image[:1], None, 10.0)
