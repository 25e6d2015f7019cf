import sys
import types

import pytest

from lm_mini.registry import Registry


def test_register_get_create_and_names():
    reg = Registry("widget")

    @reg.register("square")
    class Square:
        def __init__(self, side):
            self.side = side

    assert reg.get("square") is Square
    assert reg.create("square", side=3).side == 3
    assert reg.names() == ["square"]
    assert "square" in reg and "circle" not in reg


def test_duplicate_name_refused():
    reg = Registry("widget")
    reg.register("a")(int)
    with pytest.raises(KeyError, match="already registered"):
        reg.register("a")(float)


def test_import_path_resolves(monkeypatch):
    mod = types.ModuleType("fake_widgets_mod")
    mod.Thing = type("Thing", (), {})
    monkeypatch.setitem(sys.modules, "fake_widgets_mod", mod)
    reg = Registry("widget")
    assert reg.get("fake_widgets_mod:Thing") is mod.Thing
    with pytest.raises(KeyError, match="has no attribute 'Other'"):
        reg.get("fake_widgets_mod:Other")
    with pytest.raises(KeyError, match="cannot import module"):
        reg.get("no_such_module_xyz:Thing")


def test_unknown_name_lists_known_names():
    reg = Registry("widget", entry_point_group="lm_mini.test_widgets_none")
    reg.register("alpha")(int)
    reg.register("beta")(float)
    with pytest.raises(KeyError, match=r"unknown widget 'gamma'\. Known widgets: alpha, beta"):
        reg.get("gamma")


@pytest.mark.parametrize("name", ["ENCODERS", "PROJECTORS", "COMPRESSORS", "LLMS", "TEMPLATES", "METRICS"])
def test_builtin_names_are_what_the_home_module_registers(name):
    """A registry knows its built-in names without importing their code (config checks stay torch-free); the list
    must be exactly what importing the home module registers."""
    import importlib

    from lm_mini import registry

    reg = getattr(registry, name)
    importlib.import_module(reg.home)
    registered = {n for n, obj in reg._entries.items() if getattr(obj, "__module__", None) == reg.home}
    assert set(reg.builtin) == registered


def test_check_knows_builtin_names_without_importing_them_and_refuses_unknown_ones():
    reg = Registry("widget", home="no_such_home_module_xyz", builtin=("square",))
    reg.check("square")  # the home module is never imported for a listed name
    assert reg.names() == ["square"]
    with pytest.raises(ModuleNotFoundError):  # an unknown name loads the home module, to list what is known
        reg.check("circle")


def test_a_module_path_imports_from_the_working_directory_as_python_m_does(tmp_path, monkeypatch):
    """``lm-mini`` (a console script) does not put the working directory on sys.path; ``python -m`` does. A user's
    ``my_module.py`` there resolves either way; one found nowhere says where lm_mini looked and what to set."""
    (tmp_path / "cwd_widgets_mod.py").write_text("class Thing:\n    pass\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "cwd_widgets_mod", raising=False)
    reg = Registry("widget")
    assert reg.get("cwd_widgets_mod:Thing").__name__ == "Thing"
    with pytest.raises(KeyError, match=rf"cannot import module 'nowhere_widgets_mod'.*working directory {tmp_path}.*PYTHONPATH"):
        reg.get("nowhere_widgets_mod:Thing")
