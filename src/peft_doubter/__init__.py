"""peft-doubter: a PEFT tuner that gives a frozen causal LM a feedback channel into its own hidden states.

`import peft_doubter` registers the method with PEFT, so `get_peft_model(model, DoubterConfig(...))`,
`PeftModel.from_pretrained` and `AutoPeftModelForCausalLM.from_pretrained` work for Doubter adapters.

Sub-packages, imports flowing one way: `tuner` (the core) -> `data`, `deploy` -> `training`, `evaluation` -> `hub`
-> `agent` -> `runs` -> `serving` -> `cli`.
"""

from .tuner import (
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
