import pytest

from medxfer.registry import Registry, UnknownNameError


def test_register_get_alias_and_case():
    r: Registry[int] = Registry("thing")
    r.register("alpha-one", 1, aliases=("a1",))
    assert r.get("ALPHA-ONE") == 1
    assert r.get("a1") == 1
    assert r.canonical("A1") == "alpha-one"
    assert "a1" in r and "zzz" not in r
    assert r.names() == ["alpha-one"]


def test_unknown_name_suggests_close_match():
    r: Registry[int] = Registry("dataset")
    r.register("chexpert", 1)
    r.register("shenzhen", 2)
    with pytest.raises(UnknownNameError) as exc:
        r.get("chexpret")
    assert "Did you mean 'chexpert'" in str(exc.value)
    assert "unknown dataset 'chexpret'" in str(exc.value)


def test_no_silent_overwrite():
    r: Registry[int] = Registry("thing")
    r.register("a", 1)
    with pytest.raises(ValueError, match="already registered"):
        r.register("a", 2)
    r.register("a", 3, overwrite=True)
    assert r.get("a") == 3


def test_entry_point_plugins_are_loaded(monkeypatch):
    calls = []

    class FakeEP:
        name = "plugin"

        def load(self):
            return lambda reg: (calls.append(1), reg.register("from-plugin", 42))

    import medxfer.registry as mod

    monkeypatch.setattr(mod.metadata, "entry_points", lambda group: [FakeEP()] if group == "g" else [])
    r: Registry[int] = Registry("thing", entry_point_group="g")
    assert r.get("from-plugin") == 42
    r.names()
    assert calls == [1]  # loaded once
