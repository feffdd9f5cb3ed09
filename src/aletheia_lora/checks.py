"""Argument checks shared by every stage: one guard per kind of value, one wording per kind of mistake.

Each guard takes the argument's ``name`` as the user wrote it (``"r"`` for a Python argument, ``"--top-k"``
for a CLI flag or config-file setting) and returns the value normalised (NumPy scalars become Python
numbers, which JSON and PEFT need). A value of the wrong type raises ``TypeError``, one out of range
``ValueError``; every message reads ``"<name> must be <requirement>, got <value>"``.

The requirement is worded from the bounds (``a positive integer``, ``an integer >= 0``, ``a finite number > 0``,
``a number in [0, 1)``); ``expected=`` replaces it where a message must keep another wording. A value is shown
abridged (:func:`shown`), so a huge value never makes a huge message.

:func:`read_data_file` reads every YAML or JSON file the package is given (config files, scores.json) within
the limits below, so a hostile or broken file is refused quickly and with one line.

This module imports nothing from the package, so any module can use it.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
import reprlib
import stat
from collections.abc import Collection, Iterable, Mapping
from typing import Any

# Limits on a YAML or JSON input file. A config file of flag values is a few hundred bytes and a scores.json of
# 20,000 layers under 1 MB. YAML is parsed in pure Python (it needs hooks the C parser lacks; about 7 s per MiB
# on a slow CPU), so its files are kept small. Values count every scalar, list and mapping with YAML aliases
# expanded: an alias costs nothing to parse but is a full copy wherever the value is checked, printed or
# written back (run_config.json), so 700 bytes of nested aliases would otherwise become gigabytes.
MAX_FILE_BYTES = {"json": 16 * 2**20, "yaml": 256 * 2**10}
MAX_NESTING = 64
MAX_VALUES = 1_000_000
# Layer indices: no decoder has a million blocks, and a cost model spans blocks 0..max(index).
MAX_LAYERS = 1_000_000

_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 160
_REPR.maxlong = 60
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = _REPR.maxfrozenset = _REPR.maxdeque = 12
_REPR.maxlevel = 3


def shown(value: Any) -> str:
    """``repr(value)``, abridged with ``...`` past a few hundred characters or a dozen items (a message quotes it)."""
    try:
        return _REPR.repr(value)
    except ValueError:  # an int past Python's 4,300 digits cannot be written out, even inside a list
        if isinstance(value, numbers.Integral):
            return f"<an integer of about {int(int(value).bit_length() * 0.30103) + 1:,} digits>"
        return f"<a {_type_name(value)} holding an integer too long to write>"


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
            raise TypeError(f"{name} must be true or false, got {shown(value)}")
        choices = "True, False or None" if allow_none else "True or False"
        raise TypeError(f"{name} must be {choices}, got {shown(value)} ({_type_name(value)})")
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
        raise TypeError(f"{name} must be {expected}, got {shown(value)} ({_type_name(value)})")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be {expected}, got {shown(value)}")
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
        raise TypeError(f"{name} must be a number, got {shown(value)} ({_type_name(value)})")
    if expected is None:
        expected = _number_requirement(minimum, above, below, maximum)
    ok = math.isfinite(value)
    ok = ok and (minimum is None or value >= minimum) and (above is None or value > above)
    ok = ok and (below is None or value < below) and (maximum is None or value <= maximum)
    if not ok:
        raise ValueError(f"{name} must be {expected}, got {shown(value)}")
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
        raise TypeError(f"{name} must be a number, got {shown(value)} ({_type_name(value)})")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {shown(value)}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {shown(value)}")
    if integer and not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {shown(value)}")
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
        raise ValueError(f"{name} must be one of {listed}, got {shown(value)}")
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
        raise TypeError(f"{name} must be a list of {what} names, got {shown(value)}")
    names = list(value)
    if not all(isinstance(t, str) and t for t in names):
        raise TypeError(f"{name} must be a list of {what} names, got {shown(value)}")
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
            raise TypeError(f"selected_layers must hold integers, got {shown(layer)} ({_type_name(layer)})")
        if layer < 0:
            raise ValueError(f"selected_layers holds a negative index: {layer}")
        if num_layers is not None and layer >= num_layers:
            raise ValueError(f"selected_layers holds {layer}, out of range for a model with {num_layers} layers")
    result = sorted(int(x) for x in layers)
    # adjacent equal values of the sorted list (not a count per item: a selection may hold thousands of layers)
    duplicates = sorted({a for a, b in zip(result, result[1:]) if a == b})
    if duplicates:
        raise ValueError(f"selected_layers holds duplicates: {shown(duplicates)}")
    return result


def is_empty_sequence(value: Any) -> bool:
    """Whether a list, tuple, NumPy array or tensor holds nothing (text and scalars are not sequences here).

    An empty list has no dtype: a row's empty ``input_ids`` would otherwise be reported as floats.
    """
    if isinstance(value, (str, bytes)):
        return False
    numel = getattr(value, "numel", None)  # torch tensors
    size = numel() if callable(numel) else getattr(value, "size", None)  # NumPy arrays
    if isinstance(size, numbers.Integral):
        return size == 0
    try:
        return len(value) == 0
    except TypeError:
        return False


def validate_scores(layer_scores: Mapping[int, float]) -> dict[int, float]:
    """Check that scores map block indices (non-negative integers) to finite numbers; return a plain dict.

    Raises:
        TypeError: not a mapping, or a score that is not a number.
        ValueError: empty, a key that is not a block index (or one above :data:`MAX_LAYERS`), a score that is not
            finite, or scores whose sum is not (shares of the total would be NaN).
    """
    if not isinstance(layer_scores, Mapping):
        raise TypeError(f"layer_scores must be a mapping of layer index -> score, got {_type_name(layer_scores)}")
    if not layer_scores:
        raise ValueError("layer_scores is empty: it must contain at least one layer score")
    scores = {}
    for layer, score in layer_scores.items():
        if isinstance(layer, bool) or not isinstance(layer, numbers.Integral) or not 0 <= layer < MAX_LAYERS:
            raise ValueError(
                f"layer_scores key {shown(layer)} is not a layer index (a non-negative integer below {MAX_LAYERS:,})"
            )
        if isinstance(score, bool) or not isinstance(score, numbers.Real):
            raise TypeError(f"layer_scores[{layer}] = {shown(score)} is not a number")
        if not math.isfinite(score):
            raise ValueError(f"layer_scores[{layer}] = {shown(score)} is not finite; re-run the probe")
        scores[int(layer)] = float(score)
    check_score_total(scores.values(), "layer_scores")
    return scores


def check_score_total(scores: Iterable[float], name: str) -> None:
    """Refuse finite scores that add up to more than the largest float: every share of the total would be NaN.

    A probe never gets near (it refuses non-finite gradients); such scores were written or edited by hand.

    Raises:
        ValueError: the sum of the magnitudes is not finite.
    """
    if not math.isfinite(sum(abs(s) for s in scores)):
        raise ValueError(
            f"{name}: the scores add up to more than the largest float ({_FLOAT_MAX:.3g}), so no share of their "
            "total can be computed; divide them all by a common factor"
        )


_FLOAT_MAX = 1.7976931348623157e308


def parse_layer_scores(raw: Mapping[str, Any], where: str) -> dict[int, float]:
    """The scores of a scores file's ``{"0": 1.5, ...}`` object, checked as :func:`validate_scores` checks them.

    A key is a layer index written as ``to_json`` writes it: a key with a sign, spaces, decimals or leading zeros
    is refused (``"00"`` would silently merge with ``"0"``), as is one of :data:`MAX_LAYERS` or more.

    Args:
        raw: The parsed object.
        where: What the messages call the file (``"scores file 'x.json'"``).

    Raises:
        ValueError: a bad key, a score that is not a finite number, or scores too large to add up.
    """
    scores = {}
    for key, value in raw.items():
        if not isinstance(key, str) or not _LAYER_KEY.fullmatch(key):
            raise ValueError(
                f"{where}: layer key {shown(key)} is not an integer layer index written plainly "
                "(0, 1, 2, ...: no sign, spaces, decimals or leading zeros)"
            )
        if len(key) > len(str(MAX_LAYERS)) or int(key) >= MAX_LAYERS:
            raise ValueError(f"{where}: layer key {shown(key)} is too large for a layer index (< {MAX_LAYERS:,})")
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ValueError(f"{where}: score of layer {key} is {shown(value)}, not a finite number")
        scores[int(key)] = float(value)
    check_score_total(scores.values(), where)
    return scores


_LAYER_KEY = re.compile(r"0|[1-9][0-9]*")


# --- bounded YAML and JSON files ------------------------------------------------------------------------------


class _Refused(Exception):
    """A limit or rule of :func:`read_data_file` that the file breaks; the message says which."""


def read_data_file(path: str | os.PathLike, *, label: str = "", fmt: str | None = None) -> Any:
    """Parse a YAML or JSON file within :data:`MAX_FILE_BYTES`, :data:`MAX_NESTING` and :data:`MAX_VALUES`.

    Besides the limits, a mapping that gives one key twice is refused (JSON and YAML parsers keep the last one
    silently), and so is a YAML alias inside the node it names. Only regular files are read: a FIFO would block,
    a device never end.

    Args:
        path: The file.
        label: What the file is, for the messages (``"scores file"`` gives "scores file 'x.json' is ..."); empty
            for just the path.
        fmt: ``"yaml"`` or ``"json"``; default: YAML for a ``.yaml``/``.yml`` name, else JSON.

    Returns:
        The parsed value (YAML: as ``yaml.safe_load``; JSON: as ``json.loads``, NaN and Infinity included).

    Raises:
        ValueError: "cannot read <label> '<path>': <why>" when the file cannot be read, or
            "<label> '<path>' <problem>" when it breaks a rule or a limit or does not parse.
    """
    name = os.fspath(path)
    if fmt is None:
        fmt = "yaml" if str(name).endswith((".yaml", ".yml")) else "json"
    if fmt not in MAX_FILE_BYTES:
        raise ValueError(f"fmt must be 'yaml' or 'json', got {shown(fmt)}")
    subject = f"{label} {shown(str(name))}" if label else shown(str(name))
    limit = MAX_FILE_BYTES[fmt]
    try:
        info = os.stat(name)
        if stat.S_ISDIR(info.st_mode):
            raise ValueError(f"cannot read {subject}: it is a folder")
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"cannot read {subject}: not a regular file")
        if info.st_size > limit:
            raise ValueError(f"{subject} is too large: {info.st_size:,} bytes, more than the {limit:,} allowed")
        with open(name, "rb") as handle:
            data = handle.read(limit + 1)
    except OSError as exc:
        raise ValueError(f"cannot read {subject}: {exc.strerror or exc}") from None
    if len(data) > limit:  # it grew since the check
        raise ValueError(f"{subject} is too large: more than the {limit:,} bytes allowed")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"cannot read {subject}: not UTF-8 text (byte {exc.start})") from None
    try:
        value = _parse_yaml(text) if fmt == "yaml" else _parse_json(text)
    except _Refused as exc:
        raise ValueError(f"{subject} {exc}") from None
    except RecursionError:
        raise ValueError(f"{subject} is nested deeper than {MAX_NESTING} levels") from None
    except Exception as exc:  # every parser error means the same to the user: it does not parse
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        mark = getattr(exc, "problem_mark", None)
        if getattr(exc, "problem", None) and mark is not None:  # YAML: "expected ..., but found ..." and where
            first = f"{exc.problem} (line {mark.line + 1}, column {mark.column + 1})"
        raise ValueError(f"{subject} is not valid {fmt.upper() if fmt == 'json' else 'YAML'}: {first}") from None
    return value


def _parse_json(text: str) -> Any:
    def mapping(pairs: list[tuple[str, Any]]) -> dict:
        result = dict(pairs)
        if len(result) < len(pairs):
            seen: set[str] = set()
            twice = next(key for key, _ in pairs if key in seen or seen.add(key))
            raise _Refused(f"gives the key {shown(twice)} twice in one object")
        return result

    value = json.loads(text, object_pairs_hook=mapping)
    # JSON shares no values, so its size is the file's; only its depth needs a walk (C recursion stopped at ~1000)
    values, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        values += 1
        if depth > MAX_NESTING:
            raise _Refused(f"is nested deeper than {MAX_NESTING} levels")
        if values > MAX_VALUES:
            raise _Refused(f"holds more than {MAX_VALUES:,} values")
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
            values += len(item)  # the keys
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return value


def _parse_yaml(text: str) -> Any:
    import yaml

    class BoundedLoader(yaml.SafeLoader):
        """A safe loader that counts, while composing, each node's values with aliases expanded and its depth.

        Composing builds the node graph, in which an alias is a reference to the node it names, so counting here
        costs one step per node of the file; nothing is expanded or constructed unless the counts fit.
        """

        def __init__(self, stream: str) -> None:
            super().__init__(stream)
            self.depth = 0
            self.shape: dict[int, tuple[int, int]] = {}  # id(node) -> (values expanded, height), once composed

        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                anchor = self.peek_event().anchor
                node = self.anchors.get(anchor)
                if node is not None and id(node) not in self.shape:
                    raise _Refused(f"holds the alias *{anchor} inside the node it names (an endless value)")
                return super().compose_node(parent, index)
            self.depth += 1
            try:
                if self.depth > MAX_NESTING:
                    raise _Refused(f"is nested deeper than {MAX_NESTING} levels")
                node = super().compose_node(parent, index)
            finally:
                self.depth -= 1
            if isinstance(node, yaml.MappingNode):
                children = [child for pair in node.value for child in pair]
            elif isinstance(node, yaml.SequenceNode):
                children = node.value
            else:
                children = []
            shapes = [self.shape[id(child)] for child in children]
            values = 1 + sum(v for v, _ in shapes)
            height = 1 + max((h for _, h in shapes), default=0)
            if height > MAX_NESTING:
                raise _Refused(f"is nested deeper than {MAX_NESTING} levels (aliases expanded)")
            if values > MAX_VALUES:
                raise _Refused(f"holds more than {MAX_VALUES:,} values (aliases expanded)")
            self.shape[id(node)] = (values, height)
            return node

        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):
                seen: set[Any] = set()  # constructed scalars: str, int, float, bool, None, dates (1 == 1.0 == true)
                for key_node, _ in node.value:
                    if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                        key = self.construct_object(key_node)
                        if key in seen:
                            raise _Refused(f"gives the key {shown(key)} twice in one mapping")
                        seen.add(key)
            return super().construct_mapping(node, deep=deep)

    loader = BoundedLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()
