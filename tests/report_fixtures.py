"""A real tiny run shared by the report tests (test-support code): two models with random
weights (test-tiny and ResNet-18) on the stripes-vs-blobs folder, few-shot and linear, with
its own cache folder so the feature cache outlives any one test. Register it with
``from report_fixtures import tiny_run`` in a conftest."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class TinyRun:
    out: Path
    cache: Path
    outcome: object


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TinyRun]:
    from medxfer.config import DatasetArg, RunSpec
    from medxfer.pipeline import run
    from medxfer.testing import write_stripes_blobs

    base = tmp_path_factory.mktemp("tiny-run")
    data = write_stripes_blobs(base / "data", n_per_class=40, size=48)
    spec = RunSpec(models=("test-tiny", "supervised-r18"), datasets=(DatasetArg.parse(f"toy=folder:{data}"),),
                   protocols=("fewshot", "linear"), weights="random", image_size=32, out=str(base / "out"),
                   cache_dir=str(base / "cache"),
                   protocol_params={"fewshot": {"n_shot": 5, "n_query": 5, "episodes": 60}})
    outcome = run(spec, progress=False)
    assert not outcome.failed, [o.error for o in outcome.failed]
    yield TinyRun(Path(spec.out), base / "cache", outcome)
