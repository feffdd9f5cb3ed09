"""The shared argument checks: what they accept, what they return, and how each mistake is worded."""

import math

import numpy as np
import pytest

from aletheia_lora.checks import (
    check_bool,
    check_choice,
    check_int,
    check_names,
    check_number,
    check_positive,
    validate_scores,
    validate_selected_layers,
)


def test_check_bool():
    assert check_bool("flag", True) is True and check_bool("flag", None, allow_none=True) is None
    with pytest.raises(TypeError, match=r"^progress must be True or False, got 'no' \(str\)$"):
        check_bool("progress", "no")
    with pytest.raises(TypeError, match=r"^distributed must be True, False or None, got 1 \(int\)$"):
        check_bool("distributed", 1, allow_none=True)
    with pytest.raises(TypeError, match=r"^--pack must be true or false, got 'no'$"):  # a CLI flag
        check_bool("--pack", "no")


@pytest.mark.parametrize(
    "kwargs, value, error, message",
    [
        ({"minimum": 1}, 0, ValueError, "seq_len must be a positive integer, got 0"),
        ({"minimum": 1}, "8", TypeError, "seq_len must be a positive integer, got '8' (str)"),
        ({"minimum": 1}, True, TypeError, "seq_len must be a positive integer, got True (bool)"),
        ({"minimum": 1}, 2.0, TypeError, "seq_len must be a positive integer, got 2.0 (float)"),
        ({"minimum": 0}, -1, ValueError, "seq_len must be an integer >= 0, got -1"),
        ({"minimum": 0, "maximum": 9}, 10, ValueError, "seq_len must be an integer from 0 to 9, got 10"),
        ({}, None, TypeError, "seq_len must be an integer, got None (NoneType)"),
        ({"minimum": 1, "allow_none": True}, 0, ValueError, "seq_len must be a positive integer or None, got 0"),
        ({"minimum": 1, "expected": "an integer >= 1"}, 0, ValueError, "seq_len must be an integer >= 1, got 0"),
    ],
)
def test_check_int_wording(kwargs, value, error, message):
    with pytest.raises(error) as info:
        check_int("seq_len", value, **kwargs)
    assert str(info.value) == message


def test_check_int_returns_python_ints():
    value = check_int("n", np.int64(3), minimum=1)
    assert value == 3 and type(value) is int
    assert check_int("n", None, allow_none=True) is None


@pytest.mark.parametrize(
    "kwargs, value, error, message",
    [
        ({"minimum": 0}, -1, ValueError, "x must be a finite number >= 0, got -1"),
        ({"above": 0}, 0, ValueError, "x must be a finite number > 0, got 0"),
        ({"above": 0}, math.inf, ValueError, "x must be a finite number > 0, got inf"),
        ({}, math.nan, ValueError, "x must be a finite number, got nan"),
        ({"minimum": 0, "below": 1}, 1.0, ValueError, "x must be a number in [0, 1), got 1.0"),
        ({"above": 0, "maximum": 1}, 0, ValueError, "x must be a number in (0, 1], got 0"),
        ({"above": 0}, "fast", TypeError, "x must be a number, got 'fast' (str)"),
        ({"above": 0, "expected": "a positive number"}, -2, ValueError, "x must be a positive number, got -2"),
    ],
)
def test_check_number_wording(kwargs, value, error, message):
    with pytest.raises(error) as info:
        check_number("x", value, **kwargs)
    assert str(info.value) == message


def test_check_positive():
    assert check_positive("r", np.int32(8), integer=True) == 8 and type(check_positive("r", np.int32(8))) is int
    assert type(check_positive("alpha", np.float32(0.5))) is float
    for value, error, message in [
        (0, ValueError, "r must be positive, got 0"),
        (math.nan, ValueError, "r must be finite, got nan"),
        ("8", TypeError, "r must be a number, got '8' (str)"),
        (2.5, TypeError, "r must be an integer, got 2.5"),
    ]:
        with pytest.raises(error) as info:
            check_positive("r", value, integer=True)
        assert str(info.value) == message


def test_check_choice_and_names():
    assert check_choice("by", "layer", ("layer", "layer_and_kind")) == "layer"
    with pytest.raises(ValueError, match=r"^by must be one of \['layer', 'kind'\], got 'x'$"):
        check_choice("by", "x", ("layer", "kind"))
    with pytest.raises(ValueError, match=r"^--by must be one of layer, kind, got 'x'$"):
        check_choice("--by", "x", ("layer", "kind"))
    assert check_names("t", ("a", "b", "a")) == ["a", "b"] and check_names("t", None) is None
    with pytest.raises(TypeError, match="t must be a list of module names, got 'q_proj'"):
        check_names("t", "q_proj")
    with pytest.raises(ValueError, match="t is empty: it must name at least one parameter"):
        check_names("t", [], what="parameter")


def test_layer_checks():
    assert validate_selected_layers(np.array([3, 1])) == [1, 3]
    with pytest.raises(ValueError, match="selected_layers holds 4, out of range for a model with 4 layers"):
        validate_selected_layers([4], 4)
    with pytest.raises(TypeError, match="num_layers must be a positive integer or None, got '4'"):
        validate_selected_layers([1], "4")
    assert validate_scores({np.int64(1): np.float32(2.0)}) == {1: 2.0}
    with pytest.raises(ValueError, match=r"layer_scores\[0\] = nan is not finite"):
        validate_scores({0: math.nan})
