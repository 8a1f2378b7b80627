"""Argument checks shared by the callbacks: one message shape, naming the argument and the value it got.

Every check raises ``ValueError(f"Expected argument `{name}` to be {expectation}, but got {value!r}.")``. Booleans
are not numbers here (``True`` is not a step count), and NaN is never a valid number.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NoReturn

__all__ = [
    "bad_argument",
    "check_callable",
    "check_choice",
    "check_flag",
    "check_integer",
    "check_non_empty_str",
    "check_number",
    "check_positive_int",
]


def bad_argument(name: str, expectation: str, value: Any) -> NoReturn:
    """Raise the shared ``ValueError`` for argument ``name``: it should be ``expectation`` and is ``value``."""
    raise ValueError(f"Expected argument `{name}` to be {expectation}, but got {value!r}.")


def _is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_positive_int(name: str, value: Any, optional: bool = False) -> None:
    """An ``int`` ≥ 1 (not a bool); ``None`` too with ``optional``."""
    if optional and value is None:
        return
    if not _is_integer(value) or value < 1:
        bad_argument(name, "a positive integer" + (" or None" if optional else ""), value)


def check_integer(name: str, value: Any) -> None:
    """Any ``int`` (not a bool)."""
    if not _is_integer(value):
        bad_argument(name, "an integer", value)


def check_number(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    optional: bool = False,
) -> None:
    """A real number (``int`` or ``float``, not a bool, not NaN) within the given bounds; ``None`` with ``optional``.

    ``low``/``high`` are inclusive unless ``low_open``/``high_open``; ``None`` leaves that side unbounded.
    """
    if optional and value is None:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if ok:
        return
    if low is not None and high is not None:
        bounds = f" in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    elif low is not None:
        bounds = f" {'greater than' if low_open else 'at least'} {low:g}"
    elif high is not None:
        bounds = f" {'less than' if high_open else 'at most'} {high:g}"
    else:
        bounds = ""
    bad_argument(name, f"a number{bounds}" + (" or None" if optional else ""), value)


def check_choice(name: str, value: Any, choices: tuple[Any, ...], optional: bool = False) -> None:
    """One of ``choices``; ``None`` too with ``optional``."""
    if optional and value is None:
        return
    if isinstance(value, bool) or value not in choices:  # True == 1 would pass an int choice
        bad_argument(name, f"one of {choices}" + (" or None" if optional else ""), value)


def check_flag(name: str, value: Any) -> None:
    """A ``bool`` (not 0/1, not a string)."""
    if not isinstance(value, bool):
        bad_argument(name, "a bool", value)


def check_callable(name: str, value: Callable[..., Any] | None, optional: bool = True) -> None:
    """A callable; ``None`` too with ``optional`` (the default: the callbacks' function arguments all have one)."""
    if optional and value is None:
        return
    if not callable(value):
        bad_argument(name, "callable" + (" or None" if optional else ""), value)


def check_non_empty_str(name: str, value: Any) -> None:
    """A non-empty ``str``."""
    if not isinstance(value, str) or not value:
        bad_argument(name, "a non-empty string", value)
