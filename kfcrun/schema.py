"""Config rules that live beside the code they configure: one source of truth per knob.

A configurable argument is declared ONCE, in the signature of the function or class
that takes it, as ``typing.Annotated[<type>, <Rule>]``::

    def __init__(self, model, lr: Annotated[float, number("0.003", gt=0)], ...)

:func:`rules_of` reads those rules (for a config section such as ``optimizer``), the
config validation turns a violation into one line that names the key, what is allowed
and an example fix, and :func:`check_arguments` applies the same rules to a direct
Python call. Arguments without a rule are library-only (e.g. ``inverse_dtype``) and are
not accepted from config files. Dataclasses declare their fields the same way.

This module imports nothing from kfcrun, so every package may use it.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

__all__ = [
    "Rule",
    "boolean",
    "check_arguments",
    "choice",
    "device_rule",
    "integer",
    "list_of",
    "mapping_of_numbers",
    "number",
    "parse_period",
    "period",
    "rules_of",
    "show",
    "text",
]


@dataclass(frozen=True)
class Rule:
    """What one config key accepts.

    Attributes:
        allowed: human-readable description of the allowed values (it appears in errors).
        check: the predicate.
        example: a valid value, suggested in the fix.
    """

    allowed: str
    check: Callable[[Any], bool]
    example: str

    def problem(self, value: Any) -> str | None:
        """``None`` if ``value`` is allowed, else ``"has the wrong type"`` or ``"is out of range"``."""
        if self.check(value):
            return None
        return "has the wrong type" if not self._plausible_type(value) else "is out of range"

    def _plausible_type(self, value: Any) -> bool:
        if self.allowed.startswith(("an integer", "a number")):
            return _is_number(value) or value is None
        if self.allowed.startswith("true or false"):
            return isinstance(value, bool)
        return True


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def integer(minimum: int, example: str, optional: bool = False) -> Rule:
    """An int ``>= minimum`` (or ``None`` if ``optional``)."""
    text_ = f"an integer >= {minimum}" + (" or null" if optional else "")
    return Rule(text_, lambda v: (optional and v is None) or (_is_int(v) and v >= minimum), example)


def number(
    example: str,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
    optional: bool = False,
) -> Rule:
    """A finite int or float within the given bounds (or ``None`` if ``optional``)."""
    bounds = [
        f"> {gt:g}" if gt is not None else "",
        f">= {ge:g}" if ge is not None else "",
        f"< {lt:g}" if lt is not None else "",
        f"<= {le:g}" if le is not None else "",
    ]
    text_ = "a number " + " and ".join(b for b in bounds if b) + (" or null" if optional else "")

    def check(v: Any) -> bool:
        if optional and v is None:
            return True
        if not _is_number(v):
            return False
        return (
            (gt is None or v > gt)
            and (ge is None or v >= ge)
            and (lt is None or v < lt)
            and (le is None or v <= le)
        )

    return Rule(text_, check, example)


def choice(*values: Any) -> Rule:
    """One of ``values``; an ``Enum`` class stands for all its members' values."""
    flat: list[Any] = []
    for v in values:
        if isinstance(v, type) and issubclass(v, Enum):
            flat.extend(member.value for member in v)
        else:
            flat.append(v)
    shown = " | ".join("null" if v is None else str(v) for v in flat)

    def check(v: Any) -> bool:
        if isinstance(v, Enum):
            v = v.value
        return v in flat and type(v) is type(flat[flat.index(v)])

    return Rule(f"one of {shown}", check, str(flat[0]))


def boolean() -> Rule:
    """``True`` or ``False``."""
    return Rule("true or false", lambda v: isinstance(v, bool), "true")


def text(example: str, optional: bool = False) -> Rule:
    """Any string (or ``None`` if ``optional``)."""
    return Rule(
        "a string" + (" or null" if optional else ""),
        lambda v: (optional and v is None) or isinstance(v, str),
        example,
    )


def mapping_of_numbers(example: str) -> Rule:
    """A mapping from names (e.g. layers) to numbers ``>= 0``; its keys are not schema keys."""
    return Rule(
        "a mapping from layer name to a number >= 0",
        lambda v: v is None or (isinstance(v, Mapping) and all(_is_number(x) and x >= 0 for x in v.values())),
        example,
    )


def list_of(item: Rule, example: str) -> Rule:
    """A non-empty list whose every entry satisfies ``item``."""
    return Rule(
        f"a non-empty list, each entry {item.allowed}",
        lambda v: isinstance(v, (list, tuple)) and len(v) > 0 and all(item.check(x) for x in v),
        example,
    )


def device_rule() -> Rule:
    """A torch device name: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""

    def check(v: Any) -> bool:
        if not isinstance(v, str):
            return False
        return v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit())

    return Rule("auto | cpu | cuda | cuda:N", check, "auto")


_PERIOD = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:ep|epoch|epochs)\s*$")


def period(example: str, optional: bool = False) -> Rule:
    """A period in iterations (an int ``>= 1``) or in epochs (a string such as ``"1epoch"``, ``"0.5ep"``).

    Periods in epochs keep their meaning when the batch size changes; see :func:`parse_period`.
    """
    text_ = "an integer >= 1 (iterations) or '<x>epoch' (epochs)" + (" or null" if optional else "")

    def check(v: Any) -> bool:
        if optional and v is None:
            return True
        if _is_int(v):
            return v >= 1
        return isinstance(v, str) and (m := _PERIOD.match(v)) is not None and float(m.group(1)) > 0

    return Rule(text_, check, example)


def parse_period(value: int | str, batches_per_epoch: int) -> int:
    """Iterations of a :func:`period` value.

    Ints are taken as they are, ``"<x>epoch"`` becomes ``max(1, round(x * batches_per_epoch))``.
    """
    if _is_int(value):
        return int(value)
    m = _PERIOD.match(str(value))
    if m is None:
        raise ValueError(f"not a period: {value!r}")
    return max(1, round(float(m.group(1)) * batches_per_epoch))


def show(value: Any) -> str:
    """A value as the command line spells it (``null``, ``true``, ``{a: 1}``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, Enum):
        return str(value.value)
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {show(v)}" for k, v in value.items()) + "}"
    return str(value)


def _annotated_rule(annotation: Any) -> Rule | None:
    if typing.get_origin(annotation) is typing.Annotated:
        for meta in annotation.__metadata__:
            if isinstance(meta, Rule):
                return meta
    return None


def rules_of(
    target: Callable[..., Any] | type, prefix: str = "", skip: Iterable[str] = ()
) -> dict[str, Rule]:
    """``{prefix + name: Rule}`` for every argument (or dataclass field) of ``target`` annotated with a rule.

    For a class, the arguments of its ``__init__`` (or its dataclass fields) are read;
    ``skip`` names arguments to leave out.
    """
    skipped = set(skip)
    if dataclasses.is_dataclass(target) and isinstance(target, type):
        hints = typing.get_type_hints(target, include_extras=True)
        names = [f.name for f in dataclasses.fields(target)]
    else:
        # mypy flags __init__ read off a class object as unsound; here its signature is the point.
        fn = target.__init__ if isinstance(target, type) else target  # type: ignore[misc]
        hints = typing.get_type_hints(fn, include_extras=True)
        names = list(inspect.signature(fn).parameters)
    rules = {}
    for name in names:
        rule = _annotated_rule(hints.get(name))
        if rule is not None and name not in skipped:
            rules[prefix + name] = rule
    return rules


def check_arguments(target: Callable[..., Any] | type, values: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` for the first of ``values`` that breaks its rule in ``target``'s signature.

    The message has the config form ``name=value is out of range; allowed: ...``, so a
    direct Python call and a config file are refused in the same words.
    """
    for name, rule in rules_of(target).items():
        if name in values:
            problem = rule.problem(values[name])
            if problem is not None:
                raise ValueError(f"{name}={show(values[name])} {problem}; allowed: {rule.allowed}")
