"""The one registry (`contracts.registry`): entries added by decorator, a name twice an error, an unknown
name a UserError naming the config field and the known names, users' `package.module:name` imported in
one place."""

from __future__ import annotations

import sys
import textwrap

import pytest

from contracts.config import ConfigError
from contracts.errors import UserError
from contracts.registry import Registry, import_entry, is_user_entry


def make_colours() -> Registry:
    colours = Registry("colour", "paint.colour")

    @colours.register("red", warm=True)
    def red() -> str:
        return "red"

    @colours.register("blue", warm=False)
    def blue() -> str:
        return "blue"

    return colours


def test_entries_are_added_by_decorator_in_order_with_their_attributes() -> None:
    colours = make_colours()
    assert colours.names() == ("red", "blue") and list(colours) == ["red", "blue"] and len(colours) == 2
    assert colours.lookup("red")() == "red" and colours["blue"]() == "blue" and "red" in colours
    assert colours.entry("red").attributes == {"warm": True} and not colours.entry("blue").attributes["warm"]


def test_a_name_registered_twice_is_an_error_when_the_second_is_defined() -> None:
    colours = make_colours()
    with pytest.raises(ValueError, match=r"colour 'red' is registered twice: .*red and .*crimson"):

        @colours.register("red")
        def crimson() -> str:
            return "crimson"

    same = colours["red"]
    assert colours.register("red", warm=True)(same) is same  # the same object again (a module re-read) is fine


def test_an_unknown_name_is_a_user_error_naming_the_field_and_the_known_names() -> None:
    colours = make_colours()
    with pytest.raises(ConfigError) as e:
        colours.lookup("green")
    assert isinstance(e.value, UserError) and isinstance(e.value, ValueError)
    assert str(e.value) == "paint.colour: unknown colour 'green'; known: red, blue"
    with pytest.raises(ConfigError, match=r"^paint.colours.3: unknown colour 'green'"):
        colours.lookup("green", field="paint.colours.3")
    with pytest.raises(KeyError):
        colours["green"]
    # a registry that takes no users' own reads a dotted name as any other unknown one
    with pytest.raises(ConfigError, match="unknown colour 'os.path:join'; known: red, blue$"):
        colours.lookup("os.path:join")


def test_built_ins_modules_are_imported_on_the_first_read(tmp_path, monkeypatch) -> None:
    (tmp_path / "shapes_registry.py").write_text(
        "from contracts.registry import Registry\n"
        "SHAPES = Registry('shape', 'draw.shape', modules=('shapes_square',))\n"
    )
    (tmp_path / "shapes_square.py").write_text(
        "from shapes_registry import SHAPES\n@SHAPES.register('square')\nclass Square:\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        from shapes_registry import SHAPES

        assert "shapes_square" not in sys.modules
        assert SHAPES.names() == ("square",) and SHAPES.lookup("square").__name__ == "Square"
    finally:
        sys.modules.pop("shapes_registry", None)
        sys.modules.pop("shapes_square", None)


@pytest.fixture
def user_module(tmp_path, monkeypatch) -> str:
    (tmp_path / "my_colours.py").write_text(
        textwrap.dedent(
            """
            NUMBER = 3

            def green():
                return "green"
            """
        )
    )
    (tmp_path / "raises_on_import.py").write_text("raise RuntimeError('no config here')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_colours"
    for name in ("my_colours", "raises_on_import"):
        sys.modules.pop(name, None)


def test_users_entries_are_imported_and_adapted(user_module: str) -> None:
    def callable_only(name: str, obj: object, field: str):
        if not callable(obj):
            raise ConfigError(f"{field}: {name} is not callable")
        return obj

    colours = Registry("colour", "paint.colour", user_form="package.module:function", adapt_user=callable_only)
    assert is_user_entry("my_colours:green") and not is_user_entry("green")
    assert colours.lookup("my_colours:green")() == "green"
    assert colours.entry("my_colours:green").attributes == {}
    with pytest.raises(ConfigError, match="^paint.colour: my_colours:NUMBER is not callable$"):
        colours.lookup("my_colours:NUMBER")
    with pytest.raises(ConfigError, match=r"known: \(none\), or your own as package.module:function$"):
        colours.lookup("green")


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("my colours:green", r"f.x: 'my colours:green' is not package.module:function \(Python names, one colon\)$"),
        ("my_colours:green()", r"^f.x: 'my_colours:green\(\)' is not package.module:function"),
        ("no_such_module_here:x", "f.x: no_such_module_here:x: cannot import no_such_module_here .*every node"),
        ("raises_on_import:x", "f.x: raises_on_import:x: importing raises_on_import raised RuntimeError: no config"),
        ("my_colours:blue", "f.x: my_colours:blue: module my_colours has no 'blue'"),
    ],
)
def test_a_bad_user_path_is_a_user_error_saying_what_is_wrong(user_module: str, name: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        import_entry(name, "f.x", "package.module:function")


def test_adapt_user_needs_the_form_it_reads() -> None:
    with pytest.raises(ValueError, match="adapt_user needs the user_form"):
        Registry("colour", "paint.colour", adapt_user=lambda name, obj, field: obj)
