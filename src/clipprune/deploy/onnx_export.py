"""ONNX export of a (pruned) CLIP: ``encode_image`` and ``encode_text`` as two graphs with a dynamic batch.

Both families export through the same path: the adapter's ``encode_image`` / ``encode_text`` wrapped in a
module and traced by torch's TorchScript ONNX exporter (``dynamo=False``: the torch.export-based one needs
``onnxscript``, which this project does not pin). Per-layer widths of a pruned model are plain tensor shapes
in the graph. A layer the exporter cannot convert fails with one line naming that layer (the innermost
module running when the exporter raised).

:func:`check_onnx` compares ONNX Runtime (CPU execution provider) with PyTorch on the evaluation data:
image embeddings of the classification images, text embeddings of the class prompts (max abs difference,
``allclose`` at the stated tolerance), and the zero-shot top-1 computed from each side's embeddings.
:func:`onnx_latency_ratio` times two exported models' sessions interleaved (``evaluate.latency``).
"""
from __future__ import annotations

import os
import re
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ClipPruneError
from ..io import atomic_dir
from ..models.base import ClipModel

TOWER_FILES = {"image": "image.onnx", "text": "text.onnx"}
INPUT_NAMES = {"image": "images", "text": "tokens"}
OUTPUT_NAME = "embeddings"


class _Encoder(nn.Module):
    """``model.encode_image`` or ``model.encode_text`` as a module (what the exporter traces)."""

    def __init__(self, model: ClipModel, tower: str):
        super().__init__()
        self.inner = model.module
        self.encode = model.encode_image if tower == "image" else model.encode_text

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.encode(inputs)


def sample_inputs(model: ClipModel, tower: str, batch_size: int = 2, seed: int = 0,
                  tokenize: bool = True) -> torch.Tensor:
    """A batch to trace or time: seeded random images, or a tokenized prompt repeated (``tokenize=False`` or
    no tokenizer: token ids 1; the traced graph does not depend on the values)."""
    if tower == "image":
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(batch_size, 3, model.image_size, model.image_size, generator=gen)
    if not tokenize or getattr(model, "tokenizer", None) is None:
        return torch.ones(batch_size, model.context_length, dtype=torch.long)
    return model.tokenizer(["a photo of a thing"] * batch_size).cpu()


@contextmanager
def _layer_tracker(module: nn.Module) -> Iterator[Callable[[], list[str]]]:
    """Record the stack of modules running (forward entered, not left); the innermost is the failing layer."""
    stack: list[int] = []
    names = {id(sub): (name or type(module).__name__, type(sub).__name__) for name, sub in module.named_modules()}
    handles = []

    def enter(sub, args):
        stack.append(id(sub))

    def leave(sub, args, output):
        if stack and stack[-1] == id(sub):
            stack.pop()

    for sub in module.modules():
        handles.append(sub.register_forward_pre_hook(enter))
        handles.append(sub.register_forward_hook(leave))
    try:
        yield lambda: [f"{names[i][0]} ({names[i][1]})" for i in stack]
    finally:
        for handle in handles:
            handle.remove()


def _layer_of_operator(encoder: nn.Module, inputs: torch.Tensor, message: str) -> str:
    """The module that runs the operator an exporter message names (``operator 'aten::...'``), from the
    scopes of a TorchScript trace; a generic phrase when neither can be found."""
    match = re.search(r"operator '([\w:.]+)'", message)
    if match is None:
        return "(none recorded: the failure is in the graph conversion)"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = torch.jit.trace(encoder, (inputs,), check_trace=False).inlined_graph
    except Exception:  # the exporter's own message is still reported
        return f"(running {match[1]})"
    types = {name: type(sub).__name__ for name, sub in encoder.named_modules()}
    for node in graph.nodes():
        if node.kind() == match[1]:
            scope = node.scopeName().split("/")[-1].removeprefix("__module.")
            return f"{scope} ({types.get(scope, '?')})" if scope else f"(running {match[1]})"
    return f"(running {match[1]})"


def export_tower(model: ClipModel, tower: str, path: Path, opset: int) -> None:
    """Write one tower's encoder as an ONNX graph with a dynamic batch axis."""
    encoder = _Encoder(model, tower).eval()
    inputs = sample_inputs(model, tower, tokenize=False)
    axes = {INPUT_NAMES[tower]: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
    with _layer_tracker(encoder) as running, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter's notice
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # text pooling gathers at argmax positions, never negative: the exporter's caveat does not apply
        warnings.filterwarnings("ignore", message="Exporting aten::index operator")
        try:
            torch.onnx.export(encoder, (inputs,), str(path), dynamo=False, opset_version=opset,
                              input_names=[INPUT_NAMES[tower]], output_names=[OUTPUT_NAME], dynamic_axes=axes,
                              do_constant_folding=True)
        except Exception as err:  # any exporter failure becomes one line naming the layer
            failing = running()  # the forward itself failed inside these layers
            layer = failing[-1] if failing else _layer_of_operator(encoder, inputs, str(err))
            detail = " ".join(str(err).split())[:200]
            raise ClipPruneError(f"{model.name}: the {tower} encoder cannot be exported to ONNX opset {opset}: "
                                 f"layer {layer}: {type(err).__name__}: {detail}") from None


def export_onnx(model: ClipModel, out_dir: str | os.PathLike, opset: int) -> dict[str, Path]:
    """Write ``image.onnx`` and ``text.onnx`` of ``model`` into ``out_dir`` (atomically: both or neither)."""
    out_dir = Path(out_dir)
    model = model.eval()
    with atomic_dir(out_dir) as tmp, torch.no_grad():
        for tower, name in TOWER_FILES.items():
            export_tower(model, tower, tmp / name, opset)
    return {tower: out_dir / name for tower, name in TOWER_FILES.items()}


class OnnxEncoder:
    """An ONNX Runtime session of one exported tower (CPU execution provider)."""

    def __init__(self, path: str | os.PathLike, tower: str):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # the threads PyTorch uses: a fair ratio
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as err:
            raise ClipPruneError(f"{path}: ONNX Runtime cannot load it ({type(err).__name__}: "
                                 f"{' '.join(str(err).split())[:200]})") from None
        self.input = INPUT_NAMES[tower]

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        array = inputs.detach().cpu().numpy()
        return torch.from_numpy(self.session.run(None, {self.input: array})[0])


def onnx_encoders(directory: str | os.PathLike, towers: Iterable[str] = TOWER_FILES) -> dict[str, OnnxEncoder]:
    return {tower: OnnxEncoder(Path(directory) / TOWER_FILES[tower], tower) for tower in towers}


def file_sizes_mb(directory: str | os.PathLike) -> dict[str, float]:
    return {tower: (Path(directory) / name).stat().st_size / 2**20 for tower, name in TOWER_FILES.items()}


def _chunks(tensor: torch.Tensor, batch_size: int) -> Iterable[torch.Tensor]:
    for start in range(0, tensor.shape[0], batch_size):
        yield tensor[start:start + batch_size]


@torch.no_grad()
def check_onnx(model: ClipModel, directory: str | os.PathLike, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
               prompt_tokens: torch.Tensor, n_classes: int | None, n_templates: int, *, atol: float, rtol: float,
               batch_size: int = 128) -> dict:
    """ONNX Runtime vs PyTorch on evaluation data (module docstring); JSON-ready.

    ``batches``: ``(images, targets)`` of the classification split; ``prompt_tokens``: every template for every
    class, class by class (``zeroshot.prompt_texts`` order). ``n_classes=None``: no classification split (the
    batches are retrieval images, the tokens their captions; no zero-shot). Returns per tower ``max_abs_diff``, ``allclose``
    and ``count``, and ``zeroshot`` top-1 from each side's embeddings with ``top1_equal``.
    """
    from ..evaluate.zeroshot import classification_metrics, classifier_from_embeddings

    model = model.eval()
    encoders = onnx_encoders(directory)
    text_torch = torch.cat([model.encode_text(chunk).float() for chunk in _chunks(prompt_tokens, batch_size)])
    text_onnx = torch.cat([encoders["text"](chunk).float() for chunk in _chunks(prompt_tokens, batch_size)])
    weights = {side: classifier_from_embeddings(emb, n_classes, n_templates)
               for side, emb in (("torch", text_torch), ("onnx", text_onnx))} if n_classes else None
    logits = {"torch": [], "onnx": []}
    targets, image_diff, image_close, count = [], 0.0, True, 0
    for images, labels in batches:
        torch_out = model.encode_image(images).float()
        onnx_out = encoders["image"](images).float()
        image_diff = max(image_diff, float((torch_out - onnx_out).abs().max()))
        image_close &= bool(torch.allclose(onnx_out, torch_out, atol=atol, rtol=rtol))
        count += images.shape[0]
        if weights is not None:
            for side, out in (("torch", torch_out), ("onnx", onnx_out)):
                logits[side].append(100.0 * F.normalize(out, dim=-1) @ weights[side])
            targets.append(torch.as_tensor(labels).view(-1))
    if count == 0:
        raise ClipPruneError("ONNX check: the evaluation split has no images")
    zeroshot = None
    if weights is not None:
        top1 = {side: classification_metrics(torch.cat(logits[side]), torch.cat(targets), n_classes, ks=(1,))["acc1"]
                for side in logits}
        zeroshot = {"top1_onnx": top1["onnx"], "top1_torch": top1["torch"], "top1_equal": top1["onnx"] == top1["torch"]}
    return {
        "image": {"max_abs_diff": image_diff, "allclose": image_close, "count": count},
        "text": {"max_abs_diff": float((text_torch - text_onnx).abs().max()),
                 "allclose": bool(torch.allclose(text_onnx, text_torch, atol=atol, rtol=rtol)),
                 "count": int(prompt_tokens.shape[0])},
        "zeroshot": zeroshot,
    }


def onnx_latency_ratio(pruned_dir: str | os.PathLike, dense_dir: str | os.PathLike, inputs: dict[str, torch.Tensor],
                       warmup: int, repeats: int) -> dict:
    """ONNX Runtime latency pruned / dense per tower, interleaved in one run (``evaluate.latency.latency_ratio``).

    A tower whose two graph files are byte-identical (a tower left unpruned) is timed once, ratio 1.
    """
    from ..evaluate.latency import latency_ratio, measure_latency

    pruned, dense = onnx_encoders(pruned_dir, inputs), onnx_encoders(dense_dir, inputs)
    out = {}
    for tower, batch in inputs.items():
        name = TOWER_FILES[tower]
        if (Path(pruned_dir) / name).read_bytes() == (Path(dense_dir) / name).read_bytes():
            seconds = measure_latency(lambda: dense[tower](batch), warmup, repeats)
            out[tower] = {"ratio": 1.0, "pruned_ms": 1000 * seconds, "dense_ms": 1000 * seconds, "same_graph": True}
            continue
        timed = latency_ratio(lambda: pruned[tower](batch), lambda: dense[tower](batch), warmup, repeats)
        out[tower] = {"ratio": timed["ratio"], "pruned_ms": 1000 * timed["a_seconds"],
                      "dense_ms": 1000 * timed["b_seconds"], "same_graph": False}
    return out


def check_outputs_close(report: dict, atol: float, rtol: float, where: str) -> None:
    """One-line error when ONNX Runtime and PyTorch disagree beyond the stated tolerance."""
    bad = [tower for tower in ("image", "text") if not report[tower]["allclose"]]
    if bad:
        detail = ", ".join(f"{t} max abs diff {report[t]['max_abs_diff']:.3g}" for t in bad)
        raise ClipPruneError(f"{where}: ONNX Runtime outputs differ from PyTorch beyond onnx.atol={atol}, "
                             f"onnx.rtol={rtol} ({detail})")

