"""Config dataclasses whose field types declare what they accept, checked when a config is built.

A config is a frozen dataclass deriving from :class:`Config`. Each field's type carries its
constraints (``Annotated[int, Ge(1)]``, ``Literal[...]``, ``tuple[Size, ...]``; annotated-types,
which pydantic reads), so no config writes its own checks. Building one coerces every field
(TOML lists become tuples) and raises ValueError naming the key as ``section.key``, the bad
value and what is allowed. The pydantic validators are made the first time a class is built,
not at import: the server imports every model module.
"""
from __future__ import annotations

import dataclasses
import functools
import typing
from typing import Annotated, Any, ClassVar, Literal, Self

from annotated_types import Ge, GroupedMetadata, Gt, Le, Lt, MinLen

Size = Annotated[int, Ge(1)]  # a width, a batch size: at least one
Count = Annotated[int, Ge(0)]  # epochs, limits: zero allowed
Positive = Annotated[float, Gt(0)]  # learning rates
NonNegative = Annotated[float, Ge(0)]  # weight decay, weight cost, a loss weight
Sizes = tuple[Size, ...]  # layer widths, outermost first
Seed = Annotated[int, Ge(0), Lt(2**32)]  # what numpy, torch and scikit-learn all take

# pydantic error types that break a bound declared on the field; their message quotes the field's bounds.
BOUND_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "too_short", "too_long"}


class Config:
    """Base of the config dataclasses; ``section`` is their TOML table, the prefix of keys in error messages."""

    section: ClassVar[str] = ""
    # Keys renamed since versions were published: old name -> current name. Manifests and configs that use the old
    # name still build; the config holds the current one.
    renamed_keys: ClassVar[dict[str, str]] = {}

    def __post_init__(self) -> None:
        from pydantic import ValidationError

        problems = []
        for name, (hint, adapter) in _fields(type(self)).items():
            value = getattr(self, name)
            if _numeric(hint) and any(isinstance(v, bool) for v in (value if isinstance(value, list | tuple) else [value])):
                problems.append(f"{self.section}.{name} must be {'numbers' if isinstance(value, list | tuple) else 'a number'}, got {value!r}")
                continue  # pydantic would read true as 1
            try:
                object.__setattr__(self, name, adapter.validate_python(getattr(self, name)))
            except ValidationError as e:
                problems += [_describe(f"{self.section}.{name}", hint, error) for error in e.errors()]
        if problems:
            raise ValueError("; ".join(problems))

    @classmethod
    def from_dict(cls, values: dict[str, Any], kind: str | None = None) -> Self:
        """Build from a config table, refusing unknown keys; ``kind`` (the table's kind, if it has one) is named in that error."""
        values = cls.current_keys(values)
        allowed = sorted(f.name for f in dataclasses.fields(cls))
        unknown = sorted(set(values) - set(allowed))
        if unknown:
            of_kind = f" for {cls.section}.kind {kind!r}" if kind else ""
            raise ValueError(f"unknown key(s) {[f'{cls.section}.{key}' for key in unknown]}{of_kind}; allowed: {allowed}")
        return cls(**values)

    @classmethod
    def current_keys(cls, values: dict[str, Any]) -> dict[str, Any]:
        """``values`` with each old key name (``renamed_keys``) replaced by its current name; ValueError if both are there."""
        values = dict(values)
        for old, new in cls.renamed_keys.items():
            if old in values:
                if new in values:
                    raise ValueError(f"{cls.section}.{old} is the old name of {cls.section}.{new}; give one of them, not both")
                values[new] = values.pop(old)
        return values


@functools.cache
def _fields(cls: type) -> dict[str, tuple[Any, Any]]:
    """Field name -> (its type, a pydantic TypeAdapter for it); made once per class."""
    from pydantic import ConfigDict, TypeAdapter

    hints = typing.get_type_hints(cls, include_extras=True)
    # --set data.path=2024 reads as a number; a path is still a string. Infinity and NaN are no setting's value.
    settings = ConfigDict(coerce_numbers_to_str=True, allow_inf_nan=False)
    return {f.name: (hints[f.name], TypeAdapter(hints[f.name], config=settings)) for f in dataclasses.fields(cls)}


def _bare(hint: Any) -> Any:
    return typing.get_args(hint)[0] if typing.get_origin(hint) is Annotated else hint


def _numeric(hint: Any) -> bool:
    """Whether a field holds a number or a tuple of numbers (which a TOML boolean must not pass for)."""
    bare = _bare(hint)
    if typing.get_origin(bare) is tuple:
        bare = _bare(typing.get_args(bare)[0])
    return bare in (int, float) or any(_bare(arg) in (int, float) for arg in typing.get_args(bare) if typing.get_origin(bare) is not Literal)


def _bounds(hint: Any) -> list[str]:
    """The annotated-types bounds on ``hint`` in words: ['>= 0', '< 0.5']."""
    words = []
    for item in typing.get_args(hint)[1:] if typing.get_origin(hint) is Annotated else []:
        for bound in item if isinstance(item, GroupedMetadata) else [item]:
            if isinstance(bound, Ge):
                words.append(f">= {bound.ge}")
            elif isinstance(bound, Gt):
                words.append(f"> {bound.gt}")
            elif isinstance(bound, Le):
                words.append(f"<= {bound.le}")
            elif isinstance(bound, Lt):
                words.append(f"< {bound.lt}")
            elif isinstance(bound, MinLen):
                words.append(f"a list of at least {bound.min_length} item(s)")
    return words


def _describe(key: str, hint: Any, error: dict[str, Any]) -> str:
    """One pydantic error as 'section.key ... got VALUE', saying what the field's type allows."""
    for step in error["loc"]:  # an item of a tuple field: model.hidden[1]
        key += f"[{step}]"
        hint = typing.get_args(_bare(hint))[0]
    value = error["input"]
    if error["type"] == "literal_error":
        return f"{key} {value!r} is not one of {sorted(typing.get_args(_bare(hint)))}"
    if error["type"] in BOUND_ERRORS:
        return f"{key} must be {' and '.join(_bounds(hint))}, got {value!r}"
    # 'a valid integer', 'a valid boolean'; a tuple field is a list in TOML.
    expected = error["msg"].removeprefix("Input should be ").split(",")[0].replace("a valid tuple", "a list")
    return f"{key} must be {expected}, got {value!r}"


__all__ = ["Config", "Count", "NonNegative", "Positive", "Seed", "Size", "Sizes"]
