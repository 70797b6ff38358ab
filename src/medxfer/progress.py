"""One progress helper for every long step: bars follow the ``medxfer`` logger.

A bar is shown when the ``medxfer`` logger lets INFO messages through (the CLI's default;
``--quiet`` raises it to WARNING and so silences every bar). In Python, bars appear after
``logging.getLogger("medxfer").setLevel(logging.INFO)``; ``enabled=`` overrides per call.
"""
from __future__ import annotations

import contextvars
import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

T = TypeVar("T")
LOGGER = "medxfer"


def progress_enabled() -> bool:
    """Whether the ``medxfer`` logger is at INFO or below (progress bars are then shown)."""
    return logging.getLogger(LOGGER).isEnabledFor(logging.INFO)


def bar(total: int | None = None, desc: str = "", unit: str = "it", *, initial: int = 0,
        enabled: bool | None = None, iterable: Iterable[T] | None = None) -> Any:
    """A tqdm bar on stderr that disappears when done; silent unless :func:`progress_enabled`
    (or ``enabled=True``)."""
    from tqdm.auto import tqdm

    if enabled is None:
        enabled = _FORCED.get()
    show = progress_enabled() if enabled is None else enabled
    return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, disable=not show, leave=False,
                dynamic_ncols=True)


_FORCED: contextvars.ContextVar[bool | None] = contextvars.ContextVar("medxfer_progress", default=None)


@contextmanager
def forced(enabled: bool | None) -> Iterator[None]:
    """Within the block, bars are shown (True) or hidden (False) whatever the logger says;
    None leaves the logger in charge."""
    token = _FORCED.set(enabled)
    try:
        yield
    finally:
        _FORCED.reset(token)
