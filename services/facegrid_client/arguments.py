"""Argument types of the client's commands: a bad value is refused by argparse, with the
range it must lie in, before any call is made."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable


def resource_id(pattern: re.Pattern[str], prefix: str) -> Callable[[str], str]:
    """An AIP-122 id (``cam``), also given as its resource name (``streamProcessors/cam``)."""

    def parse(value: str) -> str:
        resource = value.removeprefix(prefix)
        if not pattern.fullmatch(resource):
            raise argparse.ArgumentTypeError(
                f"{value!r}: 1 to 63 lowercase letters, digits and hyphens, starting with a "
                "letter and not ending with a hyphen"
            )
        return resource

    return parse


def bounded_int(low: int, high: int) -> Callable[[str], int]:
    """An integer from ``low`` to ``high``, both included."""

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
        if not low <= number <= high:
            raise argparse.ArgumentTypeError(f"{number} is not in {low}..{high}")
        return number

    return parse


def bounded_float(low: float, high: float) -> Callable[[str], float]:
    """A number from ``low`` to ``high``, both included."""

    def parse(value: str) -> float:
        number = _number(value)
        if not low <= number <= high:
            raise argparse.ArgumentTypeError(f"{number:g} is not in {low:g}..{high:g}")
        return number

    return parse


def positive_float(value: str) -> float:
    number = _number(value)
    if not number > 0:
        raise argparse.ArgumentTypeError("must be positive")
    return number


# A similarity or a confidence: 0 to 100.
percentage = bounded_float(0.0, 100.0)


def _number(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
