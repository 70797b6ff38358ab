"""One small registry mechanism for models, datasets and protocols.

Register by name (with aliases), list, look up with a "did you mean ...?" error, and load
third-party plugins from Python entry points (groups ``medxfer.models``,
``medxfer.datasets``, ``medxfer.protocols``; each entry point is a callable that receives
the registry and registers into it).
"""
from __future__ import annotations

import difflib
import logging
from collections.abc import Callable, Iterator
from importlib import metadata
from typing import Generic, TypeVar

from medxfer.errors import UnknownNameError, UsageError

log = logging.getLogger(__name__)

T = TypeVar("T")

__all__ = ["Registry", "UnknownNameError"]


class Registry(Generic[T]):
    """Name -> object mapping with aliases, helpful errors and entry-point plugins."""

    def __init__(self, kind: str, entry_point_group: str | None = None,
                 discover: Callable[[], None] | None = None) -> None:
        self.kind = kind
        self.entry_point_group = entry_point_group
        self._discover = discover  # registers the built-in entries on first lookup (keeps imports light)
        self._items: dict[str, T] = {}
        self._aliases: dict[str, str] = {}
        self._plugins_loaded = False

    @staticmethod
    def _norm(name: str) -> str:
        return name.strip().lower()

    def register(self, name: str, obj: T, aliases: tuple[str, ...] = (), overwrite: bool = False) -> T:
        """Register ``obj`` under ``name`` (and ``aliases``); refuse silent overwrites."""
        key = self._norm(name)
        if not overwrite and (key in self._items or key in self._aliases):
            raise UsageError(f"{self.kind} {name!r} is already registered")
        self._items[key] = obj
        for alias in aliases:
            a = self._norm(alias)
            if a != key:
                if not overwrite and (a in self._items or a in self._aliases):
                    raise UsageError(f"{self.kind} alias {alias!r} is already registered")
                self._aliases[a] = key
        return obj

    def unregister(self, name: str) -> T:
        """Remove ``name`` and its aliases (plugins and tests that register temporarily)."""
        key = self.canonical(name)
        for alias in [a for a, k in self._aliases.items() if k == key]:
            del self._aliases[alias]
        return self._items.pop(key)

    def _load_plugins(self) -> None:
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        if self._discover is not None:
            self._discover()
        if self.entry_point_group is None:
            return
        for ep in metadata.entry_points(group=self.entry_point_group):
            try:
                hook = ep.load()
                hook(self)
            except Exception as exc:  # a broken plugin must not break the registry
                log.warning("plugin %s in %s failed to load: %s", ep.name, self.entry_point_group, exc)

    def canonical(self, name: str) -> str:
        """The registered name for ``name`` or an alias of it."""
        self._load_plugins()
        key = self._norm(name)
        if key in self._items:
            return key
        if key in self._aliases:
            return self._aliases[key]
        choices = sorted(set(self._items) | set(self._aliases))
        close = difflib.get_close_matches(key, choices, n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise UnknownNameError(
            f"unknown {self.kind} {name!r}.{hint} Known {self.kind}s: {', '.join(sorted(self._items))}"
        )

    def get(self, name: str) -> T:
        return self._items[self.canonical(name)]

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        try:
            self.canonical(name)
        except UnknownNameError:
            return False
        return True

    def names(self) -> list[str]:
        self._load_plugins()
        return sorted(self._items)

    def aliases_of(self, name: str) -> list[str]:
        key = self.canonical(name)
        return sorted(a for a, k in self._aliases.items() if k == key)

    def items(self) -> Iterator[tuple[str, T]]:
        self._load_plugins()
        yield from sorted(self._items.items())
