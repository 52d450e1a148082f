"""Third-party passes arrive through the `netsqueeze.passes` entry-point group."""

import sys
import types
from dataclasses import dataclass
from importlib import metadata
from typing import Any, ClassVar

import pytest

from netsqueeze.errors import NetsqueezeError
from netsqueeze.passes import TransformPass, registry


@dataclass(frozen=True)
class PluginPass(TransformPass):
    """A pass shipped by another package."""

    name: ClassVar[str] = "plugin_pass"
    strength: float = 0.5


def fake_entry_points(name: str, value: str) -> Any:
    ep = metadata.EntryPoint(name=name, value=value, group=registry.ENTRY_POINT_GROUP)
    return lambda group=None: [ep] if group == registry.ENTRY_POINT_GROUP else []


@pytest.fixture
def plugin_module(monkeypatch: pytest.MonkeyPatch) -> None:
    mod = types.ModuleType("fake_plugin")
    mod.PluginPass = PluginPass  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fake_plugin", mod)
    monkeypatch.setattr(registry, "_ENTRY_POINTS_LOADED", False)
    yield
    registry.unregister_pass("plugin_pass")


def test_entry_point_pass_is_registered(plugin_module: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry.metadata, "entry_points", fake_entry_points("plugin_pass", "fake_plugin:PluginPass"))
    assert registry.get_pass("plugin_pass") is PluginPass


def test_entry_point_name_must_match(plugin_module: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry.metadata, "entry_points", fake_entry_points("other", "fake_plugin:PluginPass"))
    with pytest.raises(NetsqueezeError, match="entry point 'other' names a pass whose name is 'plugin_pass'"):
        registry.all_passes()


def test_entry_point_duplicate_of_builtin(monkeypatch: pytest.MonkeyPatch) -> None:
    @dataclass(frozen=True)
    class FakeFold(TransformPass):
        name: ClassVar[str] = "fold_bn"

    mod = types.ModuleType("fake_plugin2")
    mod.FakeFold = FakeFold  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fake_plugin2", mod)
    monkeypatch.setattr(registry, "_ENTRY_POINTS_LOADED", False)
    monkeypatch.setattr(registry.metadata, "entry_points", fake_entry_points("fold_bn", "fake_plugin2:FakeFold"))
    with pytest.raises(NetsqueezeError, match="duplicate pass name 'fold_bn'"):
        registry.all_passes()
