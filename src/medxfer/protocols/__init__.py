"""Evaluation protocols (registered in :data:`medxfer.protocols.base.PROTOCOLS`)."""
from medxfer.protocols import (
    fewshot,  # noqa: F401  (registers "fewshot")
    finetune,  # noqa: F401  (registers "finetune")
    linear,  # noqa: F401  (registers "linear")
)
from medxfer.protocols.base import PROTOCOLS, EvalResult, Protocol, register_protocol

__all__ = ["PROTOCOLS", "EvalResult", "Protocol", "register_protocol"]
