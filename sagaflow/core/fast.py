"""Building pydantic models without validation, for values the engine made itself.

``model_construct`` and ``model_copy`` were the largest cost of a transition
(tens of microseconds each, several per transition). The engine only writes
values of the right types, so it builds its models here: fill in defaults,
set the instance dictionary, done. Anything from outside (the wire, the
database, user data) is still validated.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel

M = TypeVar("M", bound=BaseModel)

# BaseModel's slots, set through their descriptors: ``object.__setattr__`` by
# name costs a lookup each, on the hottest path of a transition.
_set_dict = BaseModel.__dict__["__dict__"].__set__
_set_fields_set = BaseModel.__dict__["__pydantic_fields_set__"].__set__
_set_extra = BaseModel.__dict__["__pydantic_extra__"].__set__
_set_private = BaseModel.__dict__["__pydantic_private__"].__set__

_DEFAULTS: dict[type[BaseModel], list[tuple[str, bool, Any]]] = {}
# One "fields set" per class, shared by the instances built here: every field is
# always given, and nothing adds to it (the models are frozen).
_ALL_FIELDS: dict[type[BaseModel], set[str]] = {}


def _defaults(cls: type[BaseModel]) -> list[tuple[str, bool, Any]]:
    spec = _DEFAULTS.get(cls)
    if spec is None:
        spec = [
            (name, field.default_factory is not None, field.default_factory or field.default)
            for name, field in cls.model_fields.items()
            if not field.is_required()
        ]
        _DEFAULTS[cls] = spec
    return spec


def construct(cls: type[M], /, **values: Any) -> M:
    """An instance of ``cls`` holding ``values`` (plus defaults), not validated."""
    for name, factory, default in _defaults(cls):
        if name not in values:
            values[name] = default() if factory else default
    return _instance(cls, values)


def replace(model: M, **changes: Any) -> M:
    """A copy of ``model`` with ``changes``, not validated."""
    values = model.__dict__.copy()
    values.update(changes)
    return _instance(type(model), values)  # every field is there: no defaults to add


def _instance(cls: type[M], values: dict[str, Any]) -> M:
    fields = _ALL_FIELDS.get(cls)
    if fields is None:
        fields = _ALL_FIELDS[cls] = set(cls.model_fields)
    instance = cls.__new__(cls)
    _set_dict(instance, values)
    _set_fields_set(instance, fields)
    _set_extra(instance, None)
    _set_private(instance, None)
    return instance
