"""The latency lookup table of ``search.metric: latency``, measured on the device that runs it.

Like Kwon et al.'s reference, the table holds the wall time of one attention sub-block as a function of its
kept heads and of one MLP as a function of its kept neurons; here also of the whole dense tower, so that what
the blocks do not explain (embeddings, final norm, pooling, projection) is known too. Each point is one
block of the real model (its first), pruned by the project's own ``prune_heads`` / ``prune_neurons`` to that
width with the *other* sub-block dropped, minus the block with both dropped (norms and residual adds, counted
in the tower's overhead), called as the encoder calls it on a batch of ``batch_size`` inputs. Heads are
measured at every count, neurons at ``points`` evenly spaced widths. All points (and the dense tower) are
timed round-robin, ``repeats`` rounds after ``warmup`` rounds, so load drifting during the measurement
affects every point alike, and the median of each is kept (the statistic evaluate's latency uses; the
fastest run was tried and is biased on a loaded machine: a short block call escapes other processes more
often than a whole-tower call does, so the blocks looked half as expensive as the tower).

The tower is also timed with every sub-block dropped (its "skeleton": embeddings, norms, residual adds,
pooling, projection). A block timed alone runs faster than inside its tower (caches, memory traffic), so
``search.latency`` scales the block curves until they and the skeleton add up to the dense tower.

The table is JSON, keyed by model, device and batch size in its content and in its file name
(:func:`table_name`); ``search.latency`` fits and searches it.
"""
from __future__ import annotations

import copy
import json
import os
import platform
import re
import statistics
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..errors import ClipPruneError, MaskError
from ..models.base import ClipModel
from ..models.blocks import capture_block_input
from ..models.prune import prune_heads, prune_model, prune_neurons

FORMAT = "clipprune-latency-table"
VERSION = 1


def device_name() -> str:
    """The device latency is measured on (the CPU, as evaluate measures): model name and thread count."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu {model} x{torch.get_num_threads()} threads"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")[:80]


def table_name(model: str, device: str, batch_size: int) -> str:
    """File name of the table for a model, device and batch size (the key of the cached DVC output)."""
    return f"{_slug(model)}__{_slug(device)}__b{batch_size}.json"


def neuron_widths(ffn_dim: int, points: int) -> list[int]:
    """``points`` evenly spaced MLP widths in [1, ffn_dim], ending at ffn_dim (fewer when ffn_dim is small)."""
    return sorted({max(1, round(ffn_dim * k / points)) for k in range(1, points + 1)})


def _tower_inputs(model: ClipModel, tower: str, batch_size: int, seed: int) -> torch.Tensor:
    from ..evaluate.suite import _latency_inputs  # the inputs evaluate times

    images, tokens = _latency_inputs(model, batch_size, seed)
    return images if tower == "vision" else tokens


def _block_variant(work: ClipModel, dense: ClipModel, tower: str, heads: int, neurons: int) -> torch.nn.Module:
    """A copy of block 0 of ``tower`` pruned to ``heads`` heads and ``neurons`` neurons (0: dropped)."""
    src, dst = dense.towers[tower], work.towers[tower]
    dst.set_attention(0, copy.deepcopy(src.attention(0)))
    dst.set_mlp(0, copy.deepcopy(src.mlp(0)))
    head_mask = torch.zeros(src.num_heads(0))
    head_mask[:heads] = 1.0
    neuron_mask = torch.zeros(src.ffn_dim(0))
    neuron_mask[:neurons] = 1.0
    prune_heads(dst, 0, head_mask)
    prune_neurons(dst, 0, neuron_mask)
    return copy.deepcopy(dst.blocks()[0])


def _skeleton(model: ClipModel, tower: str) -> ClipModel:
    """``model`` with every attention and MLP sub-block of ``tower`` dropped: what the blocks cannot remove."""
    from ..models.masks import full_masks

    masks = {key: torch.zeros_like(mask) for key, mask in full_masks(model, [tower]).items()}
    return prune_model(model, masks)


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@torch.inference_mode()
def measure_table(model: ClipModel, towers: Sequence[str], batch_size: int, *, warmup: int = 1, repeats: int = 5,
                  points: int = 16, seed: int = 0, inputs: dict[str, torch.Tensor] | None = None,
                  log: Callable[[str], None] | None = None) -> dict:
    """Measure the latency table of ``towers`` (module docstring); JSON-ready.

    ``inputs``: a batch per tower (``{"vision": images, "text": token ids}``); by default the random images
    and tokenized prompt that evaluate times.
    """
    model = model.eval()
    table = {"format": FORMAT, "version": VERSION, "model": model.name, "device": device_name(),
             "batch_size": batch_size, "torch_threads": torch.get_num_threads(), "warmup": warmup,
             "repeats": repeats, "towers": {}}
    for tower in towers:
        views = model.towers[tower].block_views()
        first = views[0]
        if any((v.num_heads, v.ffn_dim, v.head_dim, v.hidden) != (first.num_heads, first.ffn_dim, first.head_dim,
                                                                  first.hidden) for v in views):
            raise MaskError(f"{model.name}: a latency table needs the {tower} tower's blocks to share one shape "
                            f"(a dense model)")
        batch = inputs[tower] if inputs is not None else _tower_inputs(model, tower, batch_size, seed)
        hidden, call = capture_block_input(model, tower, batch)
        encode = model.encode_image if tower == "vision" else model.encode_text
        work = model.copy()
        heads = list(range(1, first.num_heads + 1))
        neurons = neuron_widths(first.ffn_dim, points)
        skeleton = _skeleton(model, tower)
        encode_skeleton = skeleton.encode_image if tower == "vision" else skeleton.encode_text
        runs: dict[tuple, Callable] = {("tower", 0): lambda: encode(batch),
                                       ("skeleton", 0): lambda: encode_skeleton(batch)}
        for kind, widths in (("attention", heads), ("mlp", neurons), ("empty", [0])):
            for width in widths:
                block = _block_variant(work, model, tower, width if kind == "attention" else 0,
                                       width if kind == "mlp" else 0)
                runs[(kind, width)] = (lambda b=block: call.run(b, hidden))
        del work
        times: dict[tuple, list[float]] = {key: [] for key in runs}
        for round_index in range(warmup + repeats):
            keys = list(runs) if round_index % 2 == 0 else list(reversed(runs))
            for key in keys:
                seconds = _timed(runs[key])
                if round_index >= warmup:
                    times[key].append(seconds)
        median = {key: statistics.median(values) for key, values in times.items()}
        empty = median[("empty", 0)]
        table["towers"][tower] = {
            "layers": len(views), "num_heads": first.num_heads, "ffn_dim": first.ffn_dim,
            "head_dim": first.head_dim, "hidden": first.hidden, "tokens": first.tokens,
            "dense_seconds": median[("tower", 0)], "skeleton_seconds": median[("skeleton", 0)],
            "empty_block_seconds": empty,
            "attention": {"widths": heads, "seconds": [max(0.0, median[("attention", h)] - empty) for h in heads]},
            "mlp": {"widths": neurons, "seconds": [max(0.0, median[("mlp", n)] - empty) for n in neurons]},
        }
        if log is not None:
            log(f"{tower}: dense tower {1000 * median[('tower', 0)]:.2f} ms, attention "
                f"{1000 * table['towers'][tower]['attention']['seconds'][-1]:.3f} ms and MLP "
                f"{1000 * table['towers'][tower]['mlp']['seconds'][-1]:.3f} ms per block at full width")
    return table


def read_table(directory: str | os.PathLike, model: str, device: str, batch_size: int | None = None) -> dict:
    """The table for ``model`` / ``device`` (/ ``batch_size``; None: the one table of that model and device the
    directory holds) in ``directory``; one-line error if it is not there."""
    directory = Path(directory)
    if batch_size is None:
        found = sorted(directory.glob(table_name(model, device, 0).replace("__b0.json", "__b*.json")))
        path = found[0] if len(found) == 1 else directory / table_name(model, device, 0).replace("__b0", "__b<batch>")
    else:
        path = directory / table_name(model, device, batch_size)
    if not path.is_file():
        present = sorted(p.name for p in directory.glob("*.json")) if directory.is_dir() else []
        raise ClipPruneError(f"{path}: no single latency table for model {model!r}, device {device!r}"
                             f"{'' if batch_size is None else f', batch size {batch_size}'} (present: "
                             f"{', '.join(present) or 'none'}); rerun the latency_table stage on this machine "
                             f"(dvc repro -f latency_table)")
    try:
        table = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ClipPruneError(f"{path}: not a latency table ({type(err).__name__})") from None
    if not isinstance(table, dict) or table.get("format") != FORMAT or table.get("version") != VERSION:
        raise ClipPruneError(f"{path}: not a {FORMAT} version {VERSION} file")
    expected = {"model": model, "device": device, **({} if batch_size is None else {"batch_size": batch_size})}
    for key, value in expected.items():
        if table.get(key) != value:
            raise ClipPruneError(f"{path}: {key} is {table.get(key)!r}, expected {value!r}")
    return table
