"""CLI verbs: one module per verb, each with ``add_parser(subparsers)`` and ``run(args) -> int``.

A verb registers itself in :data:`COMMANDS`; ``medxfer.cli`` builds the parser from it.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

from medxfer.registry import Registry


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: Registry[Command] = Registry("command")


def register_command(cmd: Command) -> Command:
    return COMMANDS.register(cmd.name, cmd)
