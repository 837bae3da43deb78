import pytest

from clipprune.errors import ParamError
from clipprune.params import get, get_bool, get_float, get_int, get_str, load_params

P = {"search": {"constraint": 1.5, "name": "mac", "flag": True, "n": 3, "bad": "x"}, "seed": 0}


def test_get_dotted_and_default():
    assert get(P, "search.name") == "mac"
    assert get(P, "search.missing", default=None) is None
    with pytest.raises(ParamError, match=r"^search\.missing is required"):
        get(P, "search.missing")


def test_float_range_message_names_key():
    with pytest.raises(ParamError, match=r"search\.constraint must be in \(0, 1\], got 1\.5"):
        get_float(P, "search.constraint", low=0, high=1, low_open=True)
    with pytest.raises(ParamError, match=r"search\.bad must be a finite number, got 'x'"):
        get_float(P, "search.bad")
    assert get_float({"a": 1}, "a", low=0, high=1, low_open=True) == 1.0


def test_int_bool_str():
    assert get_int(P, "search.n", min_value=1) == 3
    with pytest.raises(ParamError, match=r"search\.flag must be an integer"):
        get_int(P, "search.flag")
    with pytest.raises(ParamError, match=r"search\.n must be >= 4, got 3"):
        get_int(P, "search.n", min_value=4)
    assert get_bool(P, "search.flag") is True
    with pytest.raises(ParamError, match=r"search\.name must be one of uniform; got 'mac'"):
        get_str(P, "search.name", choices=["uniform"])


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
