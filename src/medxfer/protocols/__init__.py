"""Evaluation protocols (registered in :data:`medxfer.protocols.base.PROTOCOLS`)."""
from medxfer.protocols import fewshot  # noqa: F401  (registers "fewshot")
from medxfer.protocols import linear  # noqa: F401  (registers "linear")
from medxfer.protocols import finetune  # noqa: F401  (registers "finetune")
from medxfer.protocols.base import PROTOCOLS, EvalResult, Protocol, register_protocol

__all__ = ["PROTOCOLS", "EvalResult", "Protocol", "register_protocol"]
