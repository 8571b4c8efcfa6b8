"""``python -m kava.train ARGS`` plus a probe, for tests/test_fsdp.py (launched under torchrun).

Before each checkpoint, every rank also gathers the sharded model's full state directly with
``torch.distributed.checkpoint.state_dict.get_model_state_dict`` (every tensor, frozen ones included,
independently of kava's own gathering), and rank 0 writes it to ``<output>/gathered-<step>.safetensors``.
The test compares it with the checkpoint as a single process loads it.
"""
from __future__ import annotations

import sys

from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

import kava.train as train

_save = train.save


def save_with_probe(run):
    full = get_model_state_dict(run.kava, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if run.accelerator.is_main_process:
        save_file({k: v.clone().contiguous() for k, v in full.items()}, run.out / f"gathered-{run.state.step:06d}.safetensors")
    return _save(run)


train.save = save_with_probe  # fit looks ``save`` up at every call

if __name__ == "__main__":
    sys.exit(train.main())
