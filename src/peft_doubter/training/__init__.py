"""Training the Doubter: confirm/refuse/correct targets from the pass-1 oracle and a TRL trainer/config pair for the
two-pass loss (`DoubterTrainer`, `DoubterSFTConfig`; imported on first use, since they need TRL)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any


if TYPE_CHECKING:
    from .config import DoubterSFTConfig
    from .trainer import DoubterTrainer

__all__ = ["DoubterSFTConfig", "DoubterTrainer"]


def __getattr__(name: str) -> Any:
    if name == "DoubterSFTConfig":
        from .config import DoubterSFTConfig

        return DoubterSFTConfig
    if name == "DoubterTrainer":
        from .trainer import DoubterTrainer

        return DoubterTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
