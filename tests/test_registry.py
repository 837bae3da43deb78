"""The one Registry behind criteria, losses, searches and sparsity methods."""
import pytest

from clipprune.errors import ParamError
from clipprune.registry import Registry


def make() -> Registry:
    registry = Registry("thing.method", "method", fixed=("x",))

    @registry.register("double", flavour="plain")
    def double(x, *, factor: int = 2):
        return x * factor

    @registry.register("anything")
    def anything(x, **options):
        return x

    return registry


def test_lookup_and_listing():
    registry = make()
    assert registry.get("double")(3) == 6 and registry.get("double").flavour == "plain"
    assert registry.get("double").registered_name == "double"
    assert registry.names() == ["anything", "double"]
    assert registry.available() == {"anything": (), "double": ("factor",)}


@pytest.mark.parametrize("name", ["triple", None, 3])
def test_unknown_name_is_one_line_naming_the_key(name):
    with pytest.raises(ParamError) as err:
        make().get(name)
    assert str(err.value) == f"thing.method must be one of anything, double; got {name!r}"


def test_duplicates_are_refused():
    registry = make()
    with pytest.raises(ValueError, match=r"a method named 'double' is already registered \(.*double\)"):
        @registry.register("double")
        def other(x):
            return x
    with pytest.raises(ValueError, match="non-empty string"):
        registry.register("")


def test_options():
    registry = make()
    registry.check_options("double", {"factor": 3})
    with pytest.raises(ParamError) as err:
        registry.check_options("double", {"factr": 3})
    assert str(err.value) == "thing.options: unknown option(s) factr for method 'double'; known: factor"
    with pytest.raises(ParamError, match="known: none"):
        registry.check_options("double", {"a": 1}, known=())
    registry.check_options("anything", {"a": 1}, known=(), takes_any=True)


def test_every_library_registry_refuses_a_taken_name():
    from clipprune.scoring import register_criterion, register_loss
    from clipprune.search import register_search
    from clipprune.sparsity import register_method

    for register, name in ((register_criterion, "fisher"), (register_loss, "entropy"), (register_search, "mac"),
                           (register_method, "cap")):
        with pytest.raises(ValueError, match="already registered"):
            @register(name)
            def impostor(*args, **kwargs):
                raise AssertionError
