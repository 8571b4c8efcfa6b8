"""kava.rope: moving cached keys is the same as caching them at the other position."""
from __future__ import annotations

import pytest
import torch

from conftest import perturb_trainables, tiny_config
from kava.model import KavaModel
from kava.rope import rotary_inv_freq, rotate_keys, slot_shifts


@pytest.mark.parametrize("shift", [7, -3])
def test_rotating_cached_keys_equals_caching_at_shifted_positions(tiny_dir, shift):
    """Attention depends only on relative positions, so shifting every position id by s leaves the hidden
    states as they are and rotates every cached key by s."""
    model = KavaModel.from_config(tiny_config(tiny_dir))
    perturb_trainables(model)
    ids = torch.randint(10, 60, (2, 9))
    base = torch.arange(9)[None].expand(2, 9) + 5
    with torch.no_grad():
        a = model.decoder_stack(input_ids=ids, position_ids=base, use_cache=True)
        b = model.decoder_stack(input_ids=ids, position_ids=base + shift, use_cache=True)
    inv_freq = rotary_inv_freq(model.decoder_stack)
    for la, lb in zip(a.cache.layers, b.cache.layers):
        moved = rotate_keys(la.keys, torch.full(la.keys.shape[:-1], shift), inv_freq)
        torch.testing.assert_close(moved, lb.keys, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(la.values, lb.values, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(la.keys, lb.keys, atol=1e-3)  # the shift does change the keys


def test_rotate_by_zero_is_identity_and_shifts_compose():
    g = torch.Generator().manual_seed(0)
    k = torch.randn(3, 4, 8, generator=g)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 8, 2).float() / 8))
    torch.testing.assert_close(rotate_keys(k, torch.zeros(3, 4), inv_freq), k)
    two = rotate_keys(rotate_keys(k, torch.full((3, 4), 5), inv_freq), torch.full((3, 4), -2), inv_freq)
    torch.testing.assert_close(two, rotate_keys(k, torch.full((3, 4), 3), inv_freq), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="head dim 6"):
        rotate_keys(torch.randn(2, 6), torch.zeros(2), inv_freq)


def test_slot_shifts():
    index = torch.tensor([[0, 2, 5, -1], [1, 3, 4, 6]])
    assert slot_shifts(index).tolist() == [[0, -1, -3, 0], [-1, -2, -2, -3]]


def test_slots_option_moves_the_compressed_teacher_keys(tiny_llama_dir):
    from test_model import EXAMPLES, batches

    cached = KavaModel.from_config(tiny_config(tiny_llama_dir))
    slots = KavaModel.from_config(tiny_config(tiny_llama_dir, **{"loss.kv_key_positions": "slots"}))
    perturb_trainables(cached)
    slots.load_state_dict(cached.state_dict())
    tb, _ = batches(cached, EXAMPLES)
    with torch.no_grad():
        a = cached.compress_teacher_kv(cached.teacher(tb), torch.Generator().manual_seed(0))
        b = slots.compress_teacher_kv(slots.teacher(tb), torch.Generator().manual_seed(0))
    assert torch.equal(a.index, b.index) and torch.equal(a.values, b.values)
    want = rotate_keys(a.keys, slot_shifts(a.index), rotary_inv_freq(cached.decoder_stack))
    torch.testing.assert_close(b.keys, want)
    moved = (a.index >= 0) & (a.index != torch.arange(a.index.shape[-1]))
    assert moved.any() and not torch.allclose(b.keys[moved], a.keys[moved], atol=1e-4)
