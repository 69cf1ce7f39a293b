"""Export of the absorbed memory as a standard PEFT LoRA adapter.

PEFT stores lora_A as a Linear(in → r) weight (r × in) and lora_B as Linear(r → out) (out × r),
scaled by lora_alpha / r: exactly our A (in × r) and B (r × out) transposed, with the same scale.
The directory loads with `peft.PeftModel.from_pretrained(base, directory)`, and so in any server
that takes PEFT adapters (vLLM's multi-LoRA serving among them).
"""

from __future__ import annotations

import json
import os

from safetensors.torch import save_file


def export_peft(session, directory) -> None:
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    cfg = session.config
    alpha = cfg.alpha if cfg.alpha is not None else cfg.rank
    tensors = {}
    for name in session.delta.shapes:
        prefix = f"base_model.model.{name}"
        tensors[f"{prefix}.lora_A.weight"] = session.delta.A[name].detach().t().contiguous().cpu()
        tensors[f"{prefix}.lora_B.weight"] = session.delta.B[name].detach().t().contiguous().cpu()
    model_cfg = session.runner.model.config
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": cfg.rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": session.runner.model_type == "gpt2",
        # Full dotted names: PEFT matches them exactly, so no other module picks up the adapter.
        "target_modules": sorted(session.delta.shapes),
        "base_model_name_or_path": getattr(model_cfg, "_name_or_path", "") or None,
        "inference_mode": True,
    }
    save_file(tensors, os.path.join(directory, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        json.dump(adapter_config, f, indent=2, sort_keys=True)
