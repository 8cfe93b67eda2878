import pytest

from sparsec import OptionError, RecipeError, dump_recipe, parse_pass_arg, parse_recipe
from sparsec.passes.cleanup import DeadCode, Freeze

GOOD = """
version = 1

[[pass]]
name = "freeze"
trainable = ["*.q_proj.*"]

[[pass]]
name = "dead-code"
"""


def test_recipe_parses_in_order_with_options():
    passes = parse_recipe(GOOD)
    assert [p.name for p in passes] == ["freeze", "dead-code"]
    assert passes[0].trainable == ("*.q_proj.*",)


def test_dump_then_parse_roundtrips():
    passes = [Freeze(trainable=("a.*", "b")), DeadCode()]
    assert parse_recipe(dump_recipe(passes)) == passes


@pytest.mark.parametrize("text, where, words", [
    ('[[pass]]\nname = "dead-cod"\n', "recipe:2", ["unknown pass 'dead-cod'", "dead-code"]),
    ('[[pass]]\nname = "freeze"\ntrainabel = ["x"]\n', "recipe:3",
     ["no option 'trainabel'", "did you mean 'trainable'"]),
    ('[[pass]]\nname = "freeze"\ntrainable = 3\n', "recipe:3", ["freeze.trainable", "must be"]),
    ('[[pass]]\nname = "freeze"\n\n[[pass]]\nnam = "x"\n', "recipe:4", ["has no `name`"]),
    ('[[pass]\nname = "freeze"\n', "recipe", ["TOML syntax error"]),
    ('passes = 1\n', "recipe:1", ["unknown top-level key 'passes'"]),
    ('version = 7\n', "recipe", ["version 7"]),
])
def test_bad_recipes_get_one_located_line(text, where, words):
    with pytest.raises(RecipeError) as e:
        parse_recipe(text)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(where)
    for w in words:
        assert w in msg


def test_out_of_range_and_choices_are_checked():
    from dataclasses import dataclass

    from sparsec.passes.base import Pass, option

    @dataclass(frozen=True)
    class Ranged(Pass):
        name = "ranged-test"
        density: float = option(0.1, min=0.0, max=0.5)
        mode: str = option("a", choices=("a", "b"))

    with pytest.raises(OptionError, match=r"ranged-test.density' is 0.9, out of range"):
        Ranged(density=0.9)
    with pytest.raises(OptionError, match="choose one of 'a', 'b'"):
        Ranged(mode="c")
    assert Ranged(density=0).density == 0.0 and isinstance(Ranged(density=0).density, float)
    with pytest.raises(OptionError, match="must be float"):
        Ranged(density=True)


@pytest.mark.parametrize("arg, expected", [
    ("dead-code", DeadCode()),
    ("freeze:trainable=[*.q_proj.*, 'b']", Freeze(trainable=("*.q_proj.*", "b"))),
    ("freeze:trainable=x.*", Freeze(trainable=("x.*",))),
])
def test_pass_args(arg, expected):
    assert parse_pass_arg(arg) == expected


@pytest.mark.parametrize("arg, words", [
    ("nope", "unknown pass 'nope'"),
    ("freeze:trainable", "is not key=value"),
    ("freeze:x=1", "has no option 'x'"),
])
def test_bad_pass_args(arg, words):
    with pytest.raises(RecipeError, match=words):
        parse_pass_arg(arg)
