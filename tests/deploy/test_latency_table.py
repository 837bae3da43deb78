"""The latency table measured on a tiny model: its shape, its key, reading it back."""
import json

import pytest
import torch

from clipprune.deploy.latency_table import device_name, measure_table, neuron_widths, read_table, table_name
from clipprune.errors import ClipPruneError
from clipprune.search.latency import tower_latencies
from tests.models import sample_inputs, tiny_model


def test_neuron_widths_are_evenly_spaced_and_end_at_the_full_width():
    assert neuron_widths(3072, 16) == [192 * k for k in range(1, 17)]
    assert neuron_widths(4, 16) == [1, 2, 3, 4]


@pytest.mark.parametrize("family", ["open_clip", "hf"])
def test_a_measured_table_fits_and_reads_back(family, tmp_path):
    torch.set_num_threads(1)
    model = tiny_model(family)
    images, tokens = sample_inputs(model, batch=2)
    table = measure_table(model, ["vision", "text"], batch_size=2, warmup=0, repeats=1, points=4,
                          inputs={"vision": images, "text": tokens})
    assert table["device"] == device_name() and table["batch_size"] == 2
    for tower in ("vision", "text"):
        entry = table["towers"][tower]
        view = model.towers[tower].block_views()[0]
        assert entry["attention"]["widths"] == list(range(1, view.num_heads + 1))
        assert entry["mlp"]["widths"] == neuron_widths(view.ffn_dim, 4)
        assert all(t >= 0 for t in entry["attention"]["seconds"] + entry["mlp"]["seconds"])
        assert 0 < entry["skeleton_seconds"] and 0 < entry["dense_seconds"]
    name = table_name(model.name, table["device"], 2)
    (tmp_path / name).write_text(json.dumps(table))
    assert read_table(tmp_path, model.name, table["device"], 2) == table
    assert read_table(tmp_path, model.name, table["device"]) == table  # the one table of this model and device
    with pytest.raises(ClipPruneError, match=r"no single latency table for model .* device 'elsewhere'"):
        read_table(tmp_path, model.name, "elsewhere")
    assert set(tower_latencies(table)) == {"vision", "text"}
    with pytest.raises(ClipPruneError, match=r"no single latency table for model .* batch size 4 \(present: "):
        read_table(tmp_path, model.name, table["device"], 4)
