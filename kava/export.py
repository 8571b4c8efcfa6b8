"""``kava export``: an inference-only copy of a checkpoint, optionally with the LoRA merged into the weights.

The copy is what :meth:`kava.model.KavaModel.save` writes (config.yaml, kava_meta.json, tokenizer/,
adapter/ or model/, projection.safetensors), without the optimizer, scheduler and RNG state of a
training checkpoint, sealed with the same ``COMPLETE`` checksum marker, so every loader verifies it.

``merged=True`` merges the LoRA deltas and the trained special-token rows into the backbone
(peft ``merge_and_unload``) and saves a full-model checkpoint: ``model/`` instead of ``adapter/``
and ``lora.enabled: false`` in its config.yaml, which is how a full fine-tuning checkpoint is
stored and loaded. The merge is done in float32 and cast back to ``model.dtype`` (one rounding).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = ["export_checkpoint"]


def export_checkpoint(checkpoint: str | Path, output: str | Path, merged: bool = False) -> Path:
    """Write an inference-only (``merged``: LoRA-merged) copy of ``checkpoint`` to ``output``. -> ``output``.

    ``checkpoint``: a checkpoint directory or a training run directory (its latest complete
    checkpoint). ``output`` must not exist, or be an empty directory. The source is verified
    (checksums) before anything is read.
    """
    from kava.backbone import DTYPES
    from kava.checkpoint import CheckpointError, seal
    from kava.config import ConfigError
    from kava.evaluate import check_checkpoint
    from kava.model import KavaModel

    src = check_checkpoint(checkpoint)
    out = Path(output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out}: already exists and is not empty; choose a new --output")
    model = KavaModel.load(src)
    cfg = model.cfg
    did_merge = False
    if merged and not cfg.lora.enabled:
        log.warning("%s: a full fine-tuning checkpoint (lora.enabled=false) has no adapter to merge; "
                    "exporting its weights as they are", src)
    elif merged:
        if not hasattr(model.lm, "merge_and_unload"):  # pragma: no cover - lora.enabled loads a PeftModel
            raise CheckpointError(f"{src}: lora.enabled=true but the loaded model has no LoRA adapter")
        dtype = DTYPES[cfg.model.dtype]
        model.lm = model.lm.float().merge_and_unload().to(dtype)
        model.cfg = cfg.override(["lora.enabled=false"])
        did_merge = True

    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        (model.save_pretrained if hasattr(model, "save_pretrained") else model.save)(tmp)
        meta_path = tmp / "kava_meta.json"
        meta = json.loads(meta_path.read_text())
        meta["exported_from"] = str(src)
        if did_merge:
            meta["merged_lora"] = {"r": cfg.lora.r, "alpha": cfg.lora.alpha,
                                   "target_modules": list(cfg.lora.target_modules)}
        meta_path.write_text(json.dumps(meta, indent=1))
        seal(tmp, exported_from=str(src), merged=did_merge)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s to %s%s", src, out, " (LoRA merged into the weights)" if did_merge else "")
    return out
