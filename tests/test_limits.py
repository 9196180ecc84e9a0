"""The one table of request limits and its checker (pure: no torch, no gradio)."""

from __future__ import annotations

import math

import pytest

from steering import limits
from steering.errors import InputError


def test_every_limit_is_consistent():
    for name, limit in limits.LIMITS.items():
        assert limit.name == name and limit.help
        if limit.default is not None:
            assert limits.check(name, limit.default) == limit.default, name  # each default is allowed
        if limit.maximum is not None:
            assert limit.minimum <= limit.maximum, name


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [("max_new_tokens", 7.0, 7), ("seed", 12, 12), ("coeff", -20, -20.0), ("top_p", 1, 1.0), ("temperature", 0, 0.0)],
)
def test_check_accepts_and_types(name, value, expected):
    result = limits.check(name, value)
    assert result == expected and type(result) is type(expected)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("max_new_tokens", 0, "max_new_tokens: must be an integer from 1 to 512; got 0"),
        ("max_new_tokens", 2.5, "max_new_tokens: must be an integer from 1 to 512; got 2.5"),
        ("max_new_tokens", True, "max_new_tokens: must be a number; got True"),
        ("coeff", math.nan, "coeff: must be a finite number; got nan"),
        ("coeff", 20.5, "coeff: must be a number from -20 to 20; got 20.5"),
        ("top_p", 0, "top_p: must be a number in (0, 1]; got 0"),
        ("seed", 10**400, "seed: must be a number; got " + repr(10**400)[:57] + "..."),  # too big for a float
        ("temperature", "warm", "temperature: must be a number; got 'warm'"),
        ("seed", "7", "seed: must be a number; got '7'"),  # numeric strings are not numbers
        ("coeff", [1.0], "coeff: must be a number; got [1.0]"),
    ],
    ids=["zero", "fraction", "bool", "nan", "over", "exclusive-min", "huge-int", "word", "numeric-string", "list"],
)
def test_check_refuses_with_the_field_and_the_range(name, value, message):
    with pytest.raises(InputError) as caught:
        limits.check(name, value)
    assert str(caught.value) == message and caught.value.field == name


def test_layers_counts_and_texts():
    assert limits.check_layer(29, "layer", 30) == 29
    with pytest.raises(InputError, match=r"^vectors\[1\]\.layer: must be an integer from 0 to 29; got 30$"):
        limits.check_layer(30, "vectors[1].layer", 30)
    assert limits.check_layer(99, "layer", None) == 99  # range checked later, against the model
    with pytest.raises(InputError, match="non-negative"):
        limits.check_layer(-1, "layer", None)
    assert limits.check_count("sweep_coeffs", (0.0, 1.0), "coeffs") == (0.0, 1.0)
    with pytest.raises(InputError, match=r"^coeffs: give 1 to 8 coefficients; got 9$"):
        limits.check_count("sweep_coeffs", [0.0] * 9, "coeffs")
    with pytest.raises(InputError, match=r"^vectors: give at most 64 vectors; got 65$"):
        limits.check_count("vectors", [{}] * 65, "vectors")
    with pytest.raises(InputError, match=r"^texts: must be a list"):
        limits.check_count("similarity_texts", "dogs", "texts")
    with pytest.raises(InputError, match=r"^prompt: is 4001 characters; the limit is 4000$"):
        limits.check_text("x" * 4001, "prompt", "prompt_chars")


def test_booleans_and_texts_are_strict():
    assert limits.check_bool(False, "compare") is False
    for value in ("false", 0, None, "true"):
        with pytest.raises(InputError, match=r"^compare: must be true or false; got "):
            limits.check_bool(value, "compare")
    with pytest.raises(InputError, match=r"^prompt: contains a character that is not valid Unicode"):
        limits.check_text("hi \ud800 there", "prompt", "prompt_chars")
