"""Bad sparsity params give one-line ParamErrors naming the key."""
import pytest

from clipprune.errors import ParamError
from clipprune.sparsity import available_methods, parse_config, parse_mask_type


@pytest.mark.parametrize("section,key", [
    ({"targets": [0.5, 1.5]}, "sparsity.targets"),
    ({"targets": [0.0]}, "sparsity.targets"),
    ({"targets": [1]}, "sparsity.targets"),
    ({"targets": "half"}, "sparsity.targets"),
    ({"targets": [0.5, 0.5]}, "sparsity.targets"),
    ({"mask_type": "5:4"}, "sparsity.mask_type"),
    ({"mask_type": "0:4"}, "sparsity.mask_type"),
    ({"mask_type": "diagonal"}, "sparsity.mask_type"),
    ({"method": "obs2000"}, "sparsity.method"),
    ({"damp": 0}, "sparsity.damp"),
    ({"fisher_block_size": 0}, "sparsity.fisher_block_size"),
    ({"num_grads": 1.5}, "sparsity.num_grads"),
    ({"towers": "audio"}, "sparsity.towers"),
    ({"fisher_dtype": "float16"}, "sparsity.fisher_dtype"),
    ({"chunk_layers": 0}, "sparsity.chunk_layers"),
    ({"chunk_layers": "automatic"}, "sparsity.chunk_layers"),
    ({"chunk_layers": 2.5}, "sparsity.chunk_layers"),
    ({"offload": "yes"}, "sparsity.offload"),
    ({"hessian_damp": 0}, "sparsity.hessian_damp"),
    ({"hessian_damp": "big"}, "sparsity.hessian_damp"),
    ({"num_recomputations": 0}, "sparsity.num_recomputations"),
    ({"num_recomputations": 2.5}, "sparsity.num_recomputations"),
    ({"num_recomputations": "2"}, "sparsity.num_recomputations"),
    ({"num_recomputations": True}, "sparsity.num_recomputations"),
    ({"num_recomputations": 101}, "sparsity.num_recomputations"),
    ({"num_recomputations": 2, "mask_type": "2:4"}, "sparsity.num_recomputations"),
    ({"blocksize": 4}, "sparsity"),
])
def test_bad_params_name_the_key_on_one_line(section, key):
    with pytest.raises(ParamError) as err:
        parse_config(section, available_methods())
    message = str(err.value)
    assert message.startswith(key) and "\n" not in message


def test_defaults_and_mask_types():
    config = parse_config({}, available_methods())
    assert (config.method, config.targets, config.towers, config.damp, config.fisher_block_size) == \
        ("cap", (0.5, 0.6, 0.75), ("vision",), 1e-7, 50)
    nm = parse_mask_type("2:4")
    assert (nm.kind, nm.n, nm.m, nm.sparsity, nm.name) == ("nm", 2, 4, 0.5, "2:4")
    assert parse_mask_type("block4").group == 4
    assert parse_config({"targets": [0.75, 0.5]}).targets == (0.5, 0.75)


def test_unquoted_n_m_in_yaml_gets_a_hint():
    import yaml
    from clipprune.errors import ParamError

    value = yaml.safe_load("mask_type: 2:4")["mask_type"]  # YAML 1.1 sexagesimal: 2*60 + 4
    assert value == 124
    with pytest.raises(ParamError, match=r'got 124 \(an unquoted 2:4 in YAML is the number 124: write "2:4"\)$'):
        parse_mask_type(value)


@pytest.mark.parametrize("value", ["auto", None, 3])
def test_chunk_layers_takes_auto_null_or_a_count(value):
    assert parse_config({"chunk_layers": value}, available_methods()).chunk_layers == value
    assert parse_config({}, available_methods()).chunk_layers == "auto"


def test_num_recomputations_defaults_to_one_and_takes_unstructured_and_block4_steps():
    assert parse_config({}, available_methods()).num_recomputations == 1
    for mask_type in ("unstructured", "block4"):
        assert parse_config({"num_recomputations": 4, "mask_type": mask_type}, available_methods()).num_recomputations == 4
    assert parse_config({"num_recomputations": 1, "mask_type": "2:4"}, available_methods()).num_recomputations == 1


def test_the_n_m_refusal_is_one_line_naming_both_keys():
    with pytest.raises(ParamError) as err:
        parse_config({"num_recomputations": 3, "mask_type": "2:4"}, available_methods())
    assert str(err.value) == ("sparsity.num_recomputations must be 1 with an N:M sparsity.mask_type (the pattern "
                              "fixes the sparsity; there is no intermediate target), got 3")


def test_the_new_methods_are_registered_with_their_sources():
    from clipprune.sparsity import get_method

    assert {"cap", "fastcap", "magnitude", "sparsegpt", "wanda"} <= set(available_methods())
    assert get_method("wanda").source == get_method("sparsegpt").source == "inputs"
    assert get_method("cap").source == get_method("fastcap").source == "gradients"
