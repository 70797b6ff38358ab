"""Evaluation protocols (registered in :data:`medxfer.protocols.base.PROTOCOLS`).

Every public module of this package and of :mod:`medxfer.analysis` registers its protocol; the
registry imports them on its first lookup, so adding a protocol touches only its own module
and ``import medxfer.protocols`` stays light.
"""
from medxfer.protocols.base import PROTOCOLS, EvalResult, Protocol, register_protocol

__all__ = ["PROTOCOLS", "EvalResult", "Protocol", "register_protocol"]
