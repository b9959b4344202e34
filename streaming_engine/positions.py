"""Positions: the one module that decides which rotary position every token sees.

StreamingLLM's rule (Xiao et al., 2023, section 3.2) is that positions are *in-cache* positions, not positions in
the original text. A cache holding `n` tokens gives them positions `0..n-1`, and the next token gets `n`. The model
therefore never sees a position larger than `start_size + recent_size`, however long the stream runs.

How that is achieved without touching attention code:

* transformers' RoPE models derive the positions of new tokens from `past_key_values.get_seq_length()`, which for
  `StartRecentKVCache` is the number of tokens *held*. New tokens are therefore already placed at in-cache
  positions; `next_position_ids` returns exactly that range so callers can pass it explicitly and the reasoning
  stays here.
* Cached keys are stored *after* RoPE, so they carry the position they were encoded at. When a block of `shift`
  tokens is evicted from the middle of the cache, every key behind the gap must move `shift` positions to the left.
  RoPE is a rotation, so `R(p - shift) k = R(-shift) R(p) k`: rotating the stored key by the rotation of position
  `-shift` places it exactly where it would have been encoded. `shift_keys` does this once per eviction block.

Why once per block and in fp32: the reference implementation stores un-rotated keys and re-applies RoPE to the
whole cache on every decode step. That costs a rotation of `cache_size` keys per token. Re-rotating only at
eviction is cheaper (one rotation per eviction block), but repeated rotations compound rounding error, so each
rotation is computed in fp32 from the model's own rotary module (which gets rope scaling, partial rotary dims as in
GPT-NeoX and the head layout right) and cast back to the cache dtype once. Values carry no position and never move.

With `pos_shift=False` (the ablation), kept keys keep the rotation they were encoded with and new tokens get their
position in the original stream (`seen_tokens + i`); this is what "no position shift" means in the paper.

Batched decoding (`batch_cache.py`) stores each conversation's tokens in ring-buffer columns of a shared padded
tensor; the column a key sits in never matters, because its position is baked into the key when it is written
and re-rotated here when tokens before it are evicted. `batch_position_ids` gives every row the position it would
get alone.
"""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """The half-split rotation used by Llama, Mistral, Qwen2, GPT-NeoX and Falcon (`[x1, x2] -> [-x2, x1]`)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotation_for_offset(
    rotary_emb: torch.nn.Module, offset: int, device: torch.device, layer_type: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) of the model's rotary embedding at position `offset`, in fp32, without attention scaling.

    Returned shapes are `[rotary_dim]`. `layer_type` names the frequency set of a rotary module that keeps one
    per layer type (Gemma 3's local and global layers use different RoPE bases); None means its only set. Some
    rope types (YaRN, LongRoPE) fold an attention scale into cos/sin; composing two rotations would apply it
    twice, so it is divided out here.
    """
    probe = torch.empty(0, device=device, dtype=torch.float32)  # only its device and dtype are read
    position_ids = torch.tensor([[offset]], device=device, dtype=torch.long)
    if layer_type:
        cos, sin = rotary_emb(probe, position_ids, layer_type)  # [1, 1, rotary_dim]
        scale = getattr(rotary_emb, f"{layer_type}_attention_scaling", 1.0)
    else:
        cos, sin = rotary_emb(probe, position_ids)  # [1, 1, rotary_dim]
        scale = getattr(rotary_emb, "attention_scaling", 1.0)
    scale = float(scale or 1.0)
    # Under a device map, accelerate's hook runs the rotary module on *its* device; bring cos/sin to the keys'.
    return cos[0, 0].float().to(device) / scale, sin[0, 0].float().to(device) / scale


def shift_keys(
    keys: torch.Tensor,
    shift: int,
    rotary_emb: torch.nn.Module,
    rotation: tuple[torch.Tensor, torch.Tensor] | None = None,
    layer_type: str | None = None,
) -> torch.Tensor:
    """Move post-RoPE `keys` `shift` positions to the left (towards 0).

    keys: `[batch, kv_heads, seq, head_dim]`; only the first `rotary_dim` channels are rotated (partial rotary
    leaves the rest untouched). Computed in fp32, returned in `keys.dtype`. `rotation` is
    `rotation_for_offset(rotary_emb, -shift, keys.device)` when the caller already has it: every layer of one
    eviction uses the same rotation, so the cache computes it once per eviction rather than once per layer.
    `layer_type` picks the rotary module's frequency set for this layer (see `rotation_for_offset`).
    """
    if shift == 0 or keys.shape[-2] == 0:
        return keys
    cos, sin = rotation if rotation is not None else rotation_for_offset(rotary_emb, -shift, keys.device, layer_type)
    rotary_dim = cos.shape[-1]
    k32 = keys.float()
    rotated, passthrough = k32[..., :rotary_dim], k32[..., rotary_dim:]
    rotated = rotated * cos + rotate_half(rotated) * sin
    return torch.cat((rotated, passthrough), dim=-1).to(keys.dtype)


def first_position(cache) -> int:
    """Position of the next token fed on top of `cache` (`None`: an empty cache).

    Its in-cache position (tokens held) with position shift, its index in the whole stream without.
    """
    if cache is None:
        return 0
    if getattr(cache, "pos_shift", True):
        return cache.get_seq_length()
    return cache.seen_tokens


def next_position_ids(cache, num_new: int, device: torch.device | str = "cpu") -> torch.LongTensor:
    """Position ids `[1, num_new]` for the next `num_new` tokens fed on top of `cache`.

    In-cache positions (`held .. held+num_new-1`) with position shift, the token's index in the whole stream
    (`seen .. seen+num_new-1`) without. A `cache` of `None` means an empty cache.
    """
    first = first_position(cache)
    return torch.arange(first, first + num_new, device=device, dtype=torch.long).unsqueeze(0)


def batch_position_ids(caches, device: torch.device | str = "cpu") -> torch.LongTensor:
    """Position ids `[rows, 1]` for one token fed on top of each of `caches` (the rows of a batched decode step).

    Every row gets exactly the position it would get alone (`first_position`), whatever column its token is
    stored in: in a batch, rows of different lengths share one padded tensor, and the position is what keeps
    each row's arithmetic identical to a conversation run by itself.
    """
    firsts = [first_position(cache) for cache in caches]
    return torch.tensor(firsts, dtype=torch.long).unsqueeze(1).to(device)
