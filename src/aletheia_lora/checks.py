"""Argument checks shared by every stage: one guard per kind of value, one wording per kind of mistake.

Each guard takes the argument's ``name`` as the user wrote it (``"r"`` for a Python argument, ``"--top-k"``
for a CLI flag or config-file setting) and returns the value normalised (NumPy scalars become Python
numbers, which JSON and PEFT need). A value of the wrong type raises ``TypeError``, one out of range
``ValueError``; every message reads ``"<name> must be <requirement>, got <value>"``.

The requirement is worded from the bounds (``a positive integer``, ``an integer >= 0``, ``a finite number > 0``,
``a number in [0, 1)``); ``expected=`` replaces it where a message must keep another wording.

This module imports nothing from the package, so any module can use it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection, Iterable, Mapping
from typing import Any


def _type_name(value: Any) -> str:
    return type(value).__name__


def _is_flag(name: str) -> bool:
    """A CLI flag or config-file setting (``--top-k``): its user writes true/false, not True/False."""
    return name.startswith("--")


def check_bool(name: str, value: Any, *, allow_none: bool = False) -> bool | None:
    """Check a flag: ``True`` or ``False`` (``None`` too with ``allow_none``), never a truthy stand-in.

    Args:
        name: The argument's name; a CLI flag (``--calibrate``) is answered "true or false", as its user writes it.
        value: The value to check.
        allow_none: Accept ``None``.

    Returns:
        The value.

    Raises:
        TypeError: ``value`` is not a bool (``1``, ``"yes"``).
    """
    if value is None and allow_none:
        return None
    if not isinstance(value, bool):
        if _is_flag(name):
            raise TypeError(f"{name} must be true or false, got {value!r}")
        choices = "True, False or None" if allow_none else "True or False"
        raise TypeError(f"{name} must be {choices}, got {value!r} ({_type_name(value)})")
    return value


def _int_requirement(minimum: int | None, maximum: int | None) -> str:
    if minimum is not None and maximum is not None:
        return f"an integer from {minimum} to {maximum}"
    if minimum == 1:
        return "a positive integer"
    if minimum is not None:
        return f"an integer >= {minimum}"
    if maximum is not None:
        return f"an integer <= {maximum}"
    return "an integer"


def check_int(
    name: str,
    value: Any,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
    allow_none: bool = False,
    expected: str | None = None,
) -> int | None:
    """Check an integer (a bool is not one) within inclusive bounds.

    Args:
        name: The argument's name.
        value: The value to check: any ``numbers.Integral`` (Python or NumPy integers).
        minimum: Smallest allowed value; ``1`` reads "a positive integer".
        maximum: Largest allowed value.
        allow_none: Accept ``None`` (the requirement then ends in "or None").
        expected: The requirement's wording, instead of the one built from the bounds.

    Returns:
        The value as a Python ``int`` (or None).

    Raises:
        TypeError: not an integer; the message names the requirement and the value's type.
        ValueError: out of bounds.
    """
    if value is None and allow_none:
        return None
    if expected is None:
        expected = _int_requirement(minimum, maximum) + (" or None" if allow_none else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be {expected}, got {value!r} ({_type_name(value)})")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return int(value)


def _number_requirement(minimum, above, below, maximum) -> str:
    low = f"[{minimum}" if minimum is not None else f"({above}" if above is not None else None
    high = f"{below})" if below is not None else f"{maximum}]" if maximum is not None else None
    if low is not None and high is not None:
        return f"a number in {low}, {high}"
    if minimum is not None:
        return f"a finite number >= {minimum}"
    if above is not None:
        return f"a finite number > {above}"
    if below is not None:
        return f"a finite number < {below}"
    if maximum is not None:
        return f"a finite number <= {maximum}"
    return "a finite number"


def check_number(
    name: str,
    value: Any,
    *,
    minimum: float | None = None,
    above: float | None = None,
    below: float | None = None,
    maximum: float | None = None,
    allow_none: bool = False,
    expected: str | None = None,
) -> float | None:
    """Check a finite real number (a bool is not one) within bounds.

    Args:
        name: The argument's name.
        value: The value to check: any ``numbers.Real`` (Python or NumPy numbers).
        minimum: Lower bound, inclusive (``>=``).
        above: Lower bound, exclusive (``>``); give ``minimum`` or ``above``.
        below: Upper bound, exclusive (``<``).
        maximum: Upper bound, inclusive (``<=``); give ``below`` or ``maximum``.
        allow_none: Accept ``None``.
        expected: The requirement's wording in the ``ValueError``, instead of the one built from the bounds.

    Returns:
        The value as a Python ``float`` (or None).

    Raises:
        TypeError: not a number ("<name> must be a number, got ...").
        ValueError: not finite, or out of bounds.
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r} ({_type_name(value)})")
    if expected is None:
        expected = _number_requirement(minimum, above, below, maximum)
    ok = math.isfinite(value)
    ok = ok and (minimum is None or value >= minimum) and (above is None or value > above)
    ok = ok and (below is None or value < below) and (maximum is None or value <= maximum)
    if not ok:
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return float(value)


def check_positive(name: str, value: Any, *, integer: bool = False, allow_none: bool = False) -> int | float | None:
    """Check a positive finite number, or a positive integer with ``integer`` (a LoRA rank or alpha).

    Each mistake gets its own message: "must be a number", "must be finite", "must be positive",
    "must be an integer".

    Returns:
        The value as a Python ``int`` when it is an integer, else ``float`` (a ``LoraConfig`` holding NumPy
        scalars cannot be saved as JSON).

    Raises:
        TypeError: not a number, or not an integer with ``integer``.
        ValueError: not finite, or not positive.
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r} ({_type_name(value)})")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    if integer and not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def check_choice(name: str, value: Any, choices: Collection[str]) -> str:
    """Check that ``value`` is one of ``choices`` (strings).

    The choices are listed as a Python list (``['score', 'contiguous']``), or for a CLI flag as its user
    types them (``score, contiguous``).

    Raises:
        ValueError: not one of them.
    """
    if not isinstance(value, str) or value not in choices:
        listed = ", ".join(choices) if _is_flag(name) else str(list(choices))
        raise ValueError(f"{name} must be one of {listed}, got {value!r}")
    return value


def check_names(name: str, value: Any, *, what: str = "module", allow_none: bool = True) -> list[str] | None:
    """Check a list of names (modules, parameters): non-empty strings, at least one; duplicates dropped, in order.

    Args:
        name: The argument's name.
        value: A list (any iterable but a string) of names, or None.
        what: What the names name, for the message.
        allow_none: Accept ``None``.

    Raises:
        TypeError: a string, not an iterable, or an item that is not a non-empty string.
        ValueError: empty.
    """
    if value is None and allow_none:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(f"{name} must be a list of {what} names, got {value!r}")
    names = list(value)
    if not all(isinstance(t, str) and t for t in names):
        raise TypeError(f"{name} must be a list of {what} names, got {value!r}")
    if not names:
        raise ValueError(f"{name} is empty: it must name at least one {what}")
    return list(dict.fromkeys(names))


def validate_selected_layers(selected_layers: Any, num_layers: int | None = None) -> list[int]:
    """Check a layer selection and return it sorted. PEFT reads ``[]`` as *all* layers, so empty is an error.

    Args:
        selected_layers: Block indices, in any order (a list, tuple, range or NumPy array of integers).
        num_layers: Number of blocks of the model, to range-check the indices.

    Returns:
        The indices as sorted Python ints.

    Raises:
        TypeError: not a sequence of integers, or ``num_layers`` is not an integer.
        ValueError: empty, negative, out of range or duplicated indices.
    """
    check_int("num_layers", num_layers, minimum=1, allow_none=True)
    if isinstance(selected_layers, (str, bytes, Mapping)) or not isinstance(selected_layers, Iterable):
        raise TypeError(f"selected_layers must be a list of layer indices, got {_type_name(selected_layers)}")
    layers = list(selected_layers)
    if not layers:
        raise ValueError("selected_layers is empty; PEFT would read an empty list as 'all layers'")
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
            raise TypeError(f"selected_layers must hold integers, got {layer!r} ({_type_name(layer)})")
        if layer < 0:
            raise ValueError(f"selected_layers holds a negative index: {layer}")
        if num_layers is not None and layer >= num_layers:
            raise ValueError(f"selected_layers holds {layer}, out of range for a model with {num_layers} layers")
    duplicates = sorted({int(x) for x in layers if layers.count(x) > 1})
    if duplicates:
        raise ValueError(f"selected_layers holds duplicates: {duplicates}")
    return sorted(int(x) for x in layers)


def validate_scores(layer_scores: Mapping[int, float]) -> dict[int, float]:
    """Check that scores map block indices (non-negative integers) to finite numbers; return a plain dict.

    Raises:
        TypeError: not a mapping, or a score that is not a number.
        ValueError: empty, a key that is not a block index, or a score that is not finite.
    """
    if not isinstance(layer_scores, Mapping):
        raise TypeError(f"layer_scores must be a mapping of layer index -> score, got {_type_name(layer_scores)}")
    if not layer_scores:
        raise ValueError("layer_scores is empty: it must contain at least one layer score")
    scores = {}
    for layer, score in layer_scores.items():
        if isinstance(layer, bool) or not isinstance(layer, numbers.Integral) or layer < 0:
            raise ValueError(f"layer_scores key {layer!r} is not a layer index (a non-negative integer)")
        if isinstance(score, bool) or not isinstance(score, numbers.Real):
            raise TypeError(f"layer_scores[{layer}] = {score!r} is not a number")
        if not math.isfinite(score):
            raise ValueError(f"layer_scores[{layer}] = {score!r} is not finite; re-run the probe")
        scores[int(layer)] = float(score)
    return scores
