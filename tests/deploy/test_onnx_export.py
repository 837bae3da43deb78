"""ONNX export of pruned models of both families, checked in ONNX Runtime against PyTorch."""
import pytest
import torch
from torch import nn

from clipprune.deploy.onnx_export import OnnxEncoder, check_onnx, export_onnx, file_sizes_mb
from clipprune.errors import ClipPruneError
from clipprune.models.prune import prune_model
from tests.models import random_masks, sample_inputs, tiny_model

pytest.importorskip("onnxruntime")


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("family", ["open_clip", "hf"])
def test_onnx_runtime_matches_the_pruned_model(family, tmp_path):
    model = tiny_model(family)
    pruned = prune_model(model, random_masks(model, seed=1, real_valued=True))
    paths = export_onnx(pruned, tmp_path / "onnx", opset=17)
    assert sorted(p.name for p in (tmp_path / "onnx").iterdir()) == ["image.onnx", "text.onnx"]
    assert all(size > 0 for size in file_sizes_mb(tmp_path / "onnx").values())
    for batch in (1, 5):  # traced at batch 2: the batch axis is dynamic
        images, tokens = sample_inputs(pruned, batch=batch, seed=batch)
        with torch.no_grad():
            expected = {"image": pruned.encode_image(images), "text": pruned.encode_text(tokens)}
        for tower, inputs in (("image", images), ("text", tokens)):
            got = OnnxEncoder(paths[tower], tower)(inputs)
            assert got.shape == expected[tower].shape
            torch.testing.assert_close(got, expected[tower], atol=1e-4, rtol=1e-3)
    # the report's figures on a labelled batch: differences within tolerance, the same zero-shot top-1
    images, tokens = sample_inputs(pruned, batch=6, seed=7)
    targets = torch.tensor([0, 1, 2, 0, 1, 2])
    report = check_onnx(pruned, tmp_path / "onnx", [(images, targets)], tokens, 3, 2, atol=1e-4, rtol=1e-3)
    assert report["image"]["allclose"] and report["text"]["allclose"]
    assert report["image"]["max_abs_diff"] < 1e-4 and report["image"]["count"] == 6
    assert report["zeroshot"]["top1_equal"]
    logits = torch.nn.functional.normalize(pruned.encode_image(images), dim=-1) @ torch.nn.functional.normalize(
        torch.nn.functional.normalize(pruned.encode_text(tokens), dim=-1).view(3, 2, -1).mean(1), dim=-1).T
    assert report["zeroshot"]["top1_torch"] == pytest.approx(
        float((logits.argmax(1) == targets).float().mean()))


class _Unexportable(nn.Module):
    """An MLP stand-in whose op (a symmetric eigendecomposition) the ONNX exporter cannot convert."""

    def forward(self, x):
        gram = x @ x.transpose(-1, -2)
        return x + 0 * torch.linalg.eigvalsh(gram).unsqueeze(-1)


def test_a_layer_that_cannot_be_exported_is_named_in_one_line(tmp_path):
    model = tiny_model("open_clip")
    model.towers["vision"].set_mlp(1, _Unexportable())
    with pytest.raises(ClipPruneError) as err:
        export_onnx(model, tmp_path / "onnx", opset=17)
    message = str(err.value)
    assert "\n" not in message
    assert "image encoder cannot be exported to ONNX opset 17" in message
    assert "resblocks.1.mlp (_Unexportable)" in message
    assert not (tmp_path / "onnx").exists()  # no partial output


def test_onnx_latency_ratio_times_an_unpruned_tower_once(tmp_path):
    from clipprune.deploy.onnx_export import onnx_latency_ratio, sample_inputs as onnx_inputs

    model = tiny_model("open_clip")
    masks = random_masks(model, seed=2, real_valued=False)
    masks = {key: value for key, value in masks.items() if key.startswith("vision.")}  # text tower untouched
    export_onnx(model, tmp_path / "dense", opset=17)
    export_onnx(prune_model(model, masks), tmp_path / "pruned", opset=17)
    images, tokens = sample_inputs(model, batch=2)
    timed = onnx_latency_ratio(tmp_path / "pruned", tmp_path / "dense", {"image": images, "text": tokens}, 0, 2)
    assert timed["text"]["same_graph"] and timed["text"]["ratio"] == 1.0
    assert not timed["image"]["same_graph"] and timed["image"]["ratio"] > 0
    assert onnx_inputs(model, "text", 3, tokenize=False).shape == (3, model.context_length)
