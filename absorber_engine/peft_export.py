"""Export of the absorbed memory as a standard PEFT LoRA adapter.

PEFT stores lora_A as a Linear(in → r) weight (r × in) and lora_B as Linear(r → out) (out × r),
scaled by lora_alpha / r: exactly our A (in × r) and B (r × out) transposed, with the same scale.
The directory loads with `peft.PeftModel.from_pretrained(base, directory)`, and so in any server
that takes PEFT adapters (vLLM's multi-LoRA serving among them).
"""

from __future__ import annotations

import errno
import json
import os

from safetensors.torch import save


def export_peft(session, directory) -> None:
    from . import interrupts
    from .errors import InputError
    from .output_files import new_temp_file, output_path, sync_directory, written

    delta = session.single_delta("a PEFT adapter")
    directory = output_path(directory, "adapter directory")
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as exc:            # a file in the way, no permission, a name too long
        raise InputError(f"cannot create adapter directory {directory!r}: {exc}") from None
    cfg = session.config
    alpha = cfg.alpha if cfg.alpha is not None else cfg.rank
    tensors = {}
    for name in delta.shapes:
        prefix = f"base_model.model.{name}"
        a, b = delta.factors(name)
        tensors[f"{prefix}.lora_A.weight"] = a.detach().t().contiguous().cpu()
        tensors[f"{prefix}.lora_B.weight"] = b.detach().t().contiguous().cpu()
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
        "target_modules": sorted(delta.shapes),
        "base_model_name_or_path": getattr(model_cfg, "_name_or_path", "") or None,
        "inference_mode": True,
    }
    # Both files under temporary names first. An earlier adapter's config goes before the weights are
    # replaced and the new one comes last: an export cut off between the renames leaves a directory
    # with no config, which PEFT refuses by name, never weights read with another adapter's rank or
    # scale.
    weights, config = (os.path.join(directory, n) for n in ("adapter_model.safetensors", "adapter_config.json"))
    temporary = []
    try:
        for target in (weights, config):
            if os.path.isdir(target):
                raise InputError(f"cannot export to {directory!r}: {target} is a directory")
        fd, tmp_weights = new_temp_file(directory, ".adapter-")
        temporary.append(tmp_weights)
        with os.fdopen(fd, "wb") as f:        # into our file: save_file would make its own, 0600
            f.write(save(tensors, metadata={"format": "pt"}))
            written(f)
        fd, tmp_config = new_temp_file(directory, ".adapter-")
        temporary.append(tmp_config)
        with os.fdopen(fd, "w") as f:
            json.dump(adapter_config, f, indent=2, sort_keys=True)
            written(f)
        with interrupts.deferred():               # a kill can still cut in: the order above holds then
            if os.path.lexists(config):
                os.unlink(config)
            os.replace(tmp_weights, weights)
            os.replace(tmp_config, config)
            sync_directory(directory)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:                 # a full disk is no bad argument
            raise
        raise InputError(f"cannot write the adapter to {directory!r}: {exc}") from None
    finally:
        for tmp in temporary:
            if os.path.exists(tmp):
                os.unlink(tmp)
