"""Placeholder: sub-commands registered with the `facegrid` CLI."""

from __future__ import annotations

import argparse
from typing import Any


def register(commands: argparse._SubParsersAction[Any]) -> None:
    """Add this package's sub-commands to the `facegrid` command."""
