"""Shared fixtures: the real samples in ../shared/data (skipped when absent), temp caches."""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    env = os.environ.get("MEDXFER_SHARED_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """``../shared/data`` (or $MEDXFER_SHARED_DATA); the test is skipped when it is absent."""
    path = shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"real samples not found at {path}")
    return path


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own MEDXFER_CACHE so nothing leaks between tests or into ~/.cache."""
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("MEDXFER_CACHE", str(cache))
    return cache


@pytest.fixture(autouse=True)
def _isolated_registries() -> Iterator[None]:
    """Models, datasets and protocols a test registers (custom weights, pretrained models,
    temporary protocols) are removed afterwards, so test order never matters."""
    from medxfer.data.registry import DATASETS
    from medxfer.models.spec import MODELS
    from medxfer.protocols.base import PROTOCOLS

    registries = (MODELS, DATASETS, PROTOCOLS)
    for registry in registries:  # built-ins first, so a restore never drops them
        registry.names()
    import medxfer.models.zoo  # noqa: F401
    saved = [(dict(r._items), dict(r._aliases), r._plugins_loaded) for r in registries]
    yield
    for registry, (items, aliases, loaded) in zip(registries, saved):
        registry._items, registry._aliases, registry._plugins_loaded = items, aliases, loaded


def lazy_synthetic_copies(base: Path, n_per_class: int, size: int, seed: int) -> Callable[[str], Path]:
    """``get(name)``: a synthetic copy of dataset ``name`` in its official layout under ``base``,
    written on first use and reused afterwards."""
    from medxfer.data.synthetic import write_synthetic

    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            made[name] = write_synthetic(name, base / name, n_per_class=n_per_class, size=size, seed=seed)
        return made[name]
    return get


# the session-scoped headless Chromium (tests/browser.py); skipped where there is none
from browser import browser  # noqa: E402,F401

# the session-scoped local Ray cluster (tests/ray_cluster.py); skipped where Ray cannot start
from ray_cluster import ray_cluster  # noqa: E402,F401

# a real tiny run (two random-weight models, few-shot and linear) for the report tests
from report_fixtures import tiny_run  # noqa: E402,F401
