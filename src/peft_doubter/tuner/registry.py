"""Everything that touches PEFT's registries lives here.

PEFT's `PeftType` is a closed enum, so an out-of-tree method must add its member before
`register_peft_method` accepts it. This module owns that workaround and nothing else.
"""

from __future__ import annotations

from peft.utils.peft_types import PeftType


DOUBTER_NAME = "doubter"
DOUBTER_PREFIX = "doubter_"


def _extend_peft_type(name: str) -> PeftType:
    """Add `name` (upper case) to `PeftType` once and return the member."""
    value = name.upper()
    if value in PeftType._value2member_map_:
        return PeftType(value)
    member = str.__new__(PeftType, value)
    member._name_ = value
    member._value_ = value
    member._sort_order_ = len(PeftType._member_names_)
    member.__objclass__ = PeftType
    PeftType._member_map_[value] = member
    PeftType._value2member_map_[value] = member
    PeftType._member_names_.append(value)
    type.__setattr__(PeftType, value, member)
    return member


DOUBTER_PEFT_TYPE = _extend_peft_type(DOUBTER_NAME)


def register() -> None:
    """Register the Doubter config and tuner with PEFT (idempotent)."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method

    from .config import DoubterConfig
    from .model import DoubterModel

    if PEFT_TYPE_TO_TUNER_MAPPING.get(DOUBTER_PEFT_TYPE) is DoubterModel:
        return
    register_peft_method(name=DOUBTER_NAME, config_cls=DoubterConfig, model_cls=DoubterModel, prefix=DOUBTER_PREFIX)
