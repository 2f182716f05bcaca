"""The argument types and parser of the command line: every bad value is one line and exit code 2.

argparse's own error prints the usage block and then the error; ours prints one line, the same shape
as the errors of :mod:`quantdeploy.errors`, so a script or a person sees the cause at once. Numbers are
checked for range here, where the flag is parsed, rather than deep inside the command.
"""

from __future__ import annotations

import argparse
from typing import NoReturn


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line (``error: ...``) and exit code 2, like our own errors."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def count(minimum: int):
    """An argparse type: an integer of at least ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    parse.__name__ = f"integer >= {minimum}"
    return parse


def number(minimum: float, maximum: float = float("inf")):
    """An argparse type: a finite number in ``[minimum, maximum]``."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not minimum <= value <= maximum:  # also refuses nan
            raise argparse.ArgumentTypeError(f"must be in [{minimum}, {maximum}], got {text}")
        return value
    parse.__name__ = "number"
    return parse


def port(text: str) -> int:
    """An argparse type: a TCP port, 0 (any free port, printed when listening) to 65535."""
    value = count(0)(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"a port is 0 to 65535, got {value}")
    return value


def length_range(text: str) -> str:
    """An argparse type: ``N`` or ``LO:HI`` with 1 <= LO <= HI (a load test's prompt or output length)."""
    lo, _, hi = text.partition(":")
    try:
        low, high = int(lo), int(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or LO:HI, got {text!r}") from None
    if not 1 <= low <= high:
        raise argparse.ArgumentTypeError(f"expected 1 <= LO <= HI, got {text!r}")
    return text
