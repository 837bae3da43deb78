"""The weight tensors that weight sparsity prunes: attention q/k/v/out and MLP fc1/fc2 of the chosen towers."""
from __future__ import annotations

from collections import OrderedDict

from torch import nn

from clipprune.errors import ParamError
from clipprune.models.base import ClipModel

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")


def prunable_linears(model: ClipModel, towers) -> "OrderedDict[str, nn.Linear]":
    """Named Linear layers in forward order: ``"<tower>.<block>.<q_proj|k_proj|v_proj|out_proj|fc1|fc2>"``.

    Sub-blocks dropped by head/neuron pruning contribute nothing.
    """
    layers: OrderedDict[str, nn.Linear] = OrderedDict()
    for tower_name in towers:
        if tower_name not in model.towers:
            raise ParamError(f"sparsity.towers: the model has no {tower_name!r} tower")
        tower = model.towers[tower_name]
        for i in range(len(tower.blocks())):
            if not tower.attention_dropped(i):
                attention = tower.attention(i)
                for proj in ATTENTION_PROJECTIONS:
                    layers[f"{tower_name}.{i}.{proj}"] = getattr(attention, proj)
            if not tower.mlp_dropped(i):
                layers[f"{tower_name}.{i}.fc1"] = tower.fc1(i)
                layers[f"{tower_name}.{i}.fc2"] = tower.mlp_out_module(i)
    for name, layer in layers.items():
        if not isinstance(layer, nn.Linear):
            raise ParamError(f"sparsity: layer {name} is a {type(layer).__name__}, expected nn.Linear")
    return layers


def parameter_names(model: ClipModel, layers) -> dict[str, str]:
    """Layer name -> the state-dict key of its weight (``module.state_dict()`` naming)."""
    by_id = {id(p): key for key, p in model.module.named_parameters()}
    return {name: by_id[id(layer.weight)] for name, layer in layers.items()}
