"""A Doubter's weights load completely or not at all.

PEFT loads adapter weights non-strictly and only warns about missing keys, so another adapter's weights under a
Doubter config, or a config edited to other layers, would run with random weights. Here the incoming state dict is
checked before loading (every shape must match the config) and the loaded adapter after (every weight present,
nothing foreign, every value finite); a failed check removes the half-loaded adapter and raises an error that says
what is wrong.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch


if TYPE_CHECKING:
    from .config import DoubterConfig


CONTAINERS = ("doubter_encoder", "doubter_ca")


class CheckedLoadingMixin:
    """Load checks of the Doubter tuner (mixed into `DoubterModel`)."""

    _incoming: Optional[dict[str, tuple[int, ...]]] = None

    def _install_load_checks(self) -> None:
        if not getattr(self, "_load_checks_installed", False):
            self._register_load_state_dict_pre_hook(self._before_load)
            self._load_checks_installed = True

    def _before_load(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        """Record the incoming Doubter weights and refuse shapes that do not match the adapters' config."""
        incoming = {key[len(prefix):]: tuple(value.shape) for key, value in state_dict.items()
                    if key.startswith(prefix) and any(f"{c}." in key for c in CONTAINERS)}
        own = {key: tuple(value.shape) for key, value in self.state_dict(keep_vars=True).items()}
        wrong = [f"{key}: checkpoint {shape}, config {own[key]}" for key, shape in incoming.items()
                 if key in own and own[key] != shape and 0 not in own[key]]
        if wrong:
            raise ValueError("The Doubter weights do not match its adapter_config.json (edited after saving, or "
                             "another adapter's weights?): " + "; ".join(wrong[:5]) + (" ..." if len(wrong) > 5 else ""))
        self._incoming = incoming

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """PEFT upcasts fp16/bf16 adapter weights of the wrapped layers to fp32 (unless `autocast_adapter_dtype` is
        False); the encoder lives on the tuner, so it is cast here the same way. PEFT calls this right after loading
        an adapter's weights: the loaded adapter is checked then."""
        super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype)
        if autocast_adapter_dtype and adapter_name in self.doubter_encoder:
            for param in self.doubter_encoder[adapter_name].parameters():
                if param.dtype in (torch.float16, torch.bfloat16):
                    param.data = param.data.float()
        if self._incoming is not None:
            incoming, self._incoming = self._incoming, None
            self._check_loaded(adapter_name, incoming)

    def _check_loaded(self, adapter_name: str, incoming: dict[str, tuple[int, ...]]) -> None:
        marks = tuple(f"{container}.{adapter_name}." for container in CONTAINERS)
        params = {key: value for key, value in self.state_dict(keep_vars=True).items() if any(m in key for m in marks)}
        problems = []
        missing = sorted(set(params) - set(incoming))
        if missing:
            problems.append(f"{len(missing)} of its {len(params)} weights are missing from the checkpoint (e.g. "
                            f"{missing[0]}): another adapter's weights, or a config edited to other layers or "
                            "another encoder")
        unexpected = sorted(key for key in incoming if any(m in key for m in marks) and key not in params)
        if unexpected:
            problems.append(f"the checkpoint has {len(unexpected)} weights this config does not (e.g. {unexpected[0]})")
        broken = sorted(key for key, value in params.items() if key in incoming and not value.is_meta
                        and not torch.isfinite(value).all())
        if broken:
            problems.append(f"non-finite values (NaN or inf) in {', '.join(broken[:3])}")
        if problems:
            self.delete_adapter(adapter_name)
            raise ValueError(f"Doubter adapter {adapter_name!r} did not load: " + "; ".join(problems) + ".")


def read_adapter_config(path: Path) -> DoubterConfig:
    """The `DoubterConfig` in a saved adapter's `adapter_config.json`, with an error naming the file and what is
    wrong: not there, not JSON, not an object, another PEFT method, or an invalid setting."""
    from .config import DoubterConfig
    from .registry import DOUBTER_PEFT_TYPE

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: the adapter directory holds no Doubter adapter.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}): the adapter's config is damaged.") from None
    if not isinstance(data, dict):
        raise ValueError(  # noqa: TRY004 (a damaged file, like the other cases here)
            f"{path} must hold a JSON object (the adapter's settings), got a {type(data).__name__}.")
    if data.get("peft_type") != DOUBTER_PEFT_TYPE.value:
        found = "no peft_type" if "peft_type" not in data else f"peft_type {data['peft_type']!r}"
        raise ValueError(f"{path} has {found}, not {DOUBTER_PEFT_TYPE.value!r}: it is not a Doubter adapter (load "
                         "another PEFT method with `PeftModel.from_pretrained`).")
    try:
        return DoubterConfig.from_pretrained(str(path.parent))
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: {error}") from None


def check_adapter_weights(path: Path) -> None:
    """Refuse a missing, empty, truncated or foreign `adapter_model.safetensors` with an error naming it."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: the adapter's weights are missing (safetensors only; "
                                "pickled weights are never loaded).")
    try:
        with safe_open(str(path), framework="pt") as weights:
            keys = list(weights.keys())
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path} is not a readable safetensors file ({error}): truncated or damaged.") from None
    if not any(any(f"{c}." in key for c in CONTAINERS) for key in keys):
        raise ValueError(f"{path} holds no Doubter weights (its {len(keys)} tensors look like "
                         f"{keys[:2]}): another adapter's weights?")


def load_saved_doubter(base: torch.nn.Module, directory: Path, adapter_name: str = "default",
                       is_trainable: bool = False) -> Any:
    """`PeftModel.from_pretrained` for a Doubter saved in `directory`, with its files checked first, so that a damaged
    or foreign file fails with an error naming it (see `read_adapter_config`, `check_adapter_weights`)."""
    from peft import PeftModel

    from ..names import ADAPTER_CONFIG, ADAPTER_WEIGHTS

    directory = Path(directory)
    config = read_adapter_config(directory / ADAPTER_CONFIG)
    check_adapter_weights(directory / ADAPTER_WEIGHTS)
    return PeftModel.from_pretrained(base, directory, adapter_name=adapter_name, is_trainable=is_trainable,
                                     config=config)
