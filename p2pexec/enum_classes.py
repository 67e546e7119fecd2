"""The user's own ``Enum`` classes, carried by value to task processes and named on the way back.

dill cannot pickle an enum class by value (its members refer to the class:
"recursive self-references"), so it fell back to naming it, and a worker
has no ``__main__.Color`` or ``mytypes.Color``.  Here the class is rebuilt
the way cloudpickle does it: a skeleton made by the enum's metaclass from
its bases and member values, then its methods and each member's own
attributes set once the class exists (so a method that refers to the
class finds it in the pickle's memo).  A result naming a rebuilt class
goes back by name: the client has the original.
"""

from __future__ import annotations

import enum
import pickle
import types
import weakref
from typing import Any

#: the enum machinery's own entries in a class's namespace, rebuilt by the metaclass
_MADE_BY_ENUM = frozenset({
    "__module__", "__qualname__", "__doc__", "__new__", "_new_member_", "_use_args_", "_member_names_",
    "_member_map_", "_value2member_map_", "_unhashable_values_", "_member_type_", "_value_repr_",
    "_generate_next_value_", "_boundary_", "_flag_mask_", "_singles_mask_", "_all_bits_", "_inverted_",
    "__dict__", "__weakref__"})
_MEMBER_OWN = frozenset({"_value_", "_name_", "__objclass__", "_sort_order_"})
_DESCRIPTORS = (types.FunctionType, classmethod, staticmethod, property, types.DynamicClassAttribute)

rebuilt: "weakref.WeakSet[type]" = weakref.WeakSet()  # classes this process rebuilt from a pickle


def save_enum_class(pickler: Any, cls: enum.EnumMeta) -> None:
    """Pickle ``cls``, an enum class of the user's code: by value, or by name if it was rebuilt here."""
    if cls in rebuilt:
        pickler.save(cls.__module__)
        pickler.save(cls.__qualname__)
        pickler.write(pickle.STACK_GLOBAL)
        pickler.memoize(cls)
        return
    declared: dict[str, Any] = dict(cls.__members__)
    members = {name: member._value_ for name, member in declared.items()}
    extras = {name: value for name, value in vars(cls).items()
              if name not in _MADE_BY_ENUM and name not in members and _own(name, value)}
    own: dict[str, dict[str, Any]] = {
        name: state for name, member in declared.items()
        if (state := {k: v for k, v in vars(member).items() if k not in _MEMBER_OWN})}
    pickler.save_reduce(make_enum, (type(cls), cls.__name__, cls.__qualname__, cls.__module__, cls.__bases__,
                                     members, getattr(cls, "_boundary_", None)),
                        state=(cls.__doc__, extras, own), state_setter=_set_enum_state, obj=cls)


def named(module: str, qualname: str) -> type | None:
    """A class rebuilt here that goes by that name, if any (they all stand for the client's one)."""
    return next((c for c in rebuilt if c.__module__ == module and c.__qualname__ == qualname), None)


def _own(name: str, value: Any) -> bool:
    """Is ``value`` something the class's author put there: a method or property not of the enum module, or
    any other value under a name the enum machinery does not use (``_sunder_`` and ``__dunder__``)?"""
    if isinstance(value, _DESCRIPTORS):
        return getattr(getattr(value, "__func__", value), "__module__", None) != "enum"
    return not (name.startswith("_") and name.endswith("_"))


def make_enum(metaclass: type, name: str, qualname: str, module: str, bases: tuple[type, ...],
               members: dict[str, Any], boundary: Any) -> type:
    namespace = metaclass.__prepare__(name, bases)
    for member, value in members.items():
        namespace[member] = value
    cls = metaclass(name, bases, namespace, **({"boundary": boundary} if boundary is not None else {}))
    cls.__module__, cls.__qualname__ = module, qualname
    rebuilt.add(cls)
    return cls


def _set_enum_state(cls: Any, state: tuple[str | None, dict[str, Any], dict[str, dict[str, Any]]]) -> None:
    doc, extras, own = state
    cls.__doc__ = doc
    for name, value in extras.items():
        setattr(cls, name, value)
    for name, attributes in own.items():
        cls.__members__[name].__dict__.update(attributes)
