"""Reading params.yaml (clipprune.params.load_params); clipprune.config validates it (test_config.py)."""
import pytest

from clipprune.errors import ParamError
from clipprune.params import load_params


def test_load_params_errors(tmp_path):
    with pytest.raises(ParamError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "p.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ParamError, match="not valid YAML"):
        load_params(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ParamError, match="expected a mapping"):
        load_params(bad)


def test_params_are_read_as_yaml_1_2_like_dvc_writes_them(tmp_path):
    from clipprune.params import load_params

    path = tmp_path / "params.yaml"
    # what `dvc exp run -S 'sparsity.mask_type="2:4"' -S x.flag=yes` leaves in params.yaml
    path.write_text("sparsity:\n  mask_type: 2:4\n  damp: 1e-7\nx:\n  flag: yes\n  on_off: true\n")
    params = load_params(path)
    assert params["sparsity"]["mask_type"] == "2:4"  # not 124 (YAML 1.1 base 60)
    assert params["sparsity"]["damp"] == 1e-7        # a float, not the string '1e-7'
    assert params["x"] == {"flag": "yes", "on_off": True}


@pytest.mark.parametrize("text, message", [
    ("a: [1, 2\n", "not valid YAML"),
    ("a: 1\na: 2\n", "not valid YAML"),
    ("- 1\n- 2\n", "expected a mapping of stage sections at top level"),
])
def test_bad_params_files_are_named(tmp_path, text, message):
    from clipprune.params import load_params

    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ParamError, match=message) as info:
        load_params(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
