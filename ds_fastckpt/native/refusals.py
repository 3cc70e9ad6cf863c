"""Refusals worded from pydantic field declarations, so that a limit and the message stating it cannot drift apart.

``allowed_values`` turns a field's type and constraints into words ("an
integer >= 0", "a positive multiple of 4096", "one of 'off', 'size'");
``refusal`` finds which field of a model refused a value, under the key the
user wrote; ``NotAllowed`` is the error that names both.
"""

from typing import Annotated, Any, Iterable, Literal, NamedTuple, Type, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

# Error types pydantic reports for a value beyond an upper bound, the one refusal a caller may word better
# (a host limit below the declared one).
_TOO_LARGE = frozenset({"less_than_equal", "less_than"})


class Refusal(NamedTuple):
    """The first value a model refused, in the terms the user wrote it."""

    key: str
    """The key as written: the field's alias where it has one."""
    allowed: str
    """What the field accepts, in words (see ``allowed_values``)."""
    too_large: bool
    """The value is of the right type but beyond an upper bound."""


class NotAllowed(ValueError):
    """A value a declared field refuses; the message names the argument, the value and what is allowed."""

    def __init__(self, key: str, value: Any, allowed: str):
        super().__init__(f"{key}={value!r} is not allowed: it must be {allowed}")
        self.key = key
        self.value = value
        self.allowed = allowed

    def __reduce__(self):
        # Rebuilt from its fields, so it pickles across processes (the default would pass the message as key).
        return type(self), (self.key, self.value, self.allowed)


def refusal(model: Type[BaseModel], error: ValidationError) -> Refusal:
    """Which field of ``model`` refused a value in ``error``, and what that field allows.

    Args:
        model: the model whose construction raised ``error``.
        error: the ``ValidationError`` it raised.
    """
    first = error.errors()[0]
    written = str(first["loc"][0]) if first["loc"] else ""
    for name, field in model.model_fields.items():
        if written in (name, field.alias):
            return Refusal(field.alias or name, allowed_values(field), first["type"] in _TOO_LARGE)
    known = ", ".join(field.alias or name for name, field in model.model_fields.items())
    return Refusal(written, f"left out (known keys: {known})", False)


def allowed_values(field: FieldInfo) -> str:
    """What ``field`` accepts, in words, from its type and declared constraints.

    For example ``"an integer >= 0"``, ``"a positive multiple of 4096"``,
    ``"one of 'off', 'size'"``, ``"true or false"`` or ``"a finite number of
    seconds > 0"``. A ``note`` in the field's ``json_schema_extra`` follows in
    parentheses, a ``unit`` names what a number counts.
    """
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    bounds = _bounds(field.metadata)
    words = _describe(_members(field.annotation), bounds, extra.get("unit"))
    note = extra.get("note")
    return f"{words} ({note})" if note else words


def _members(annotation: Any) -> list:
    """The plain types an annotation accepts: a Union's members, without Annotated metadata."""
    if get_origin(annotation) is Annotated:
        return _members(get_args(annotation)[0])
    if get_origin(annotation) is Union:
        return [member for arg in get_args(annotation) for member in _members(arg)]
    return [annotation]


def _bounds(metadata: Iterable[Any]) -> dict:
    """The constraints pydantic keeps as metadata objects (annotated_types.Ge, MultipleOf, ...), by name."""
    found = {}
    for item in metadata:
        for name in ("gt", "ge", "lt", "le", "multiple_of", "allow_inf_nan"):
            value = getattr(item, name, None)
            if value is not None:
                found[name] = value
    return found


def _describe(members: list, bounds: dict, unit: Any) -> str:
    if len(members) == 1 and get_origin(members[0]) is Literal:
        return f"one of {', '.join(repr(choice) for choice in get_args(members[0]))}"
    if members == [bool]:
        return "true or false"
    if all(member is int for member in members):
        return _describe_integer(bounds)
    noun = "finite number" if bounds.get("allow_inf_nan") is False else "number"
    if unit:
        noun += f" of {unit}"
    return _article(noun + _comparisons(bounds, "gt", "ge") + _upper(bounds))


def _describe_integer(bounds: dict) -> str:
    lowest = bounds["gt"] + 1 if "gt" in bounds else bounds.get("ge")
    noun = f"multiple of {bounds['multiple_of']}" if "multiple_of" in bounds else "integer"
    if lowest == 1:
        return _article(f"positive {noun}" + _upper(bounds))
    return _article(noun + ("" if lowest is None else f" >= {lowest}") + _upper(bounds))


def _comparisons(bounds: dict, *names: str) -> str:
    signs = {"gt": ">", "ge": ">="}
    return "".join(f" {signs[name]} {bounds[name]}" for name in names if name in bounds)


def _upper(bounds: dict) -> str:
    if "le" in bounds:
        return f", at most {bounds['le']}"
    if "lt" in bounds:
        return f", below {bounds['lt']}"
    return ""


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase
