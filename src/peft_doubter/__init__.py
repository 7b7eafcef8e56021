"""peft-doubter: a PEFT tuner that gives a frozen causal LM a feedback channel into its own hidden states.

`import peft_doubter` registers the method with PEFT, so `get_peft_model(model, DoubterConfig(...))`,
`PeftModel.from_pretrained` and `AutoPeftModelForCausalLM.from_pretrained` work for Doubter adapters.

Sub-packages, imports flowing one way: `tuner` (the core) -> `data`, `deploy` -> `training`, `evaluation` -> `hub`
-> `agent` -> `runs` -> `serving` -> `cli`.
"""

import logging


def _import_peft_quietly() -> None:
    """PEFT imports bitsandbytes whenever it is installed; on CPUs with AVX512-BF16 its CPU back-end then logs a
    warning about an optional kernel download, at import time, before anything is quantized. The user did nothing
    to cause it, so that logger is quiet for the import (a later quantized model logs as usual)."""
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        import peft  # noqa: F401
    finally:
        logger.setLevel(level)


_import_peft_quietly()

from .tuner import (  # noqa: E402
    DOUBTER_PEFT_TYPE,
    BottleneckCrossAttention,
    CognitiveEncoder,
    DoubterConfig,
    DoubterLayer,
    DoubterModel,
    register,
)


register()

__all__ = [
    "DOUBTER_PEFT_TYPE",
    "BottleneckCrossAttention",
    "CognitiveEncoder",
    "DoubterConfig",
    "DoubterLayer",
    "DoubterModel",
]
__version__ = "0.1.0"
