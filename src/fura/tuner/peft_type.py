"""The `PeftType` member "FURA": peft's enum only knows its own methods, so a method from outside adds its member.

This sits at the bottom of the tuner: `FuraConfig` needs the member, and registration needs the config.
"""

from __future__ import annotations

from peft.utils import PeftType

NAME = "fura"
PREFIX = "fura_"


def _add_peft_type(name: str) -> PeftType:
    """Add ``name`` to the `PeftType` str-enum, or return the member if it is already there."""
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    type.__setattr__(PeftType, name, member)
    return member


FURA_PEFT_TYPE = _add_peft_type(NAME.upper())
