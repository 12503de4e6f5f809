"""Bidirectional Transformer in the Qwen2 / Dream / DiffuCoder layout.

Token embedding, RoPE, grouped-query attention with q/k/v bias, RMSNorm, SwiGLU
MLP, tied or untied output head. Attention is bidirectional by default; a causal
mode (and anything in between, for attention-mask annealing) is selected per call
with `lookahead`. Layers are stacked with `nn.scan` (one compiled layer, params
with a leading "layers" axis), so a 28-layer model compiles as fast as a 1-layer one.

Every parameter carries logical axis names (`nn.with_logical_partitioning`) and the
main activations carry `nn.with_logical_constraint`; `dllm.sharding` maps the names
onto a device mesh.

    model = Transformer(ModelConfig(**PRESETS["tiny"]))
    params = model.init(rng, tokens)["params"]
    logits = model.apply({"params": params}, tokens)        # [B, S, V] float32
    nll, predicted = model.apply({"params": params}, tokens, targets=targets)  # [B, S] each

With `targets`, the output head scores them in chunks of the sequence
(`kernels.cross_entropy`: the [B, S, V] logits never exist whole). Attention runs on
the path `model.attention` names (`kernels.attention`: XLA, cuDNN flash, Pallas
splash); `model.remat` picks what the backward pass recomputes.

Decoding with a KV cache (Fast-dLLM's approximation, used by `dllm.sampling`): a
full call with `return_kv=True` also returns every layer's keys and values; a later
call on a window of the canvas (`cache=kv, window_start=start`) computes only the
window's tokens, which attend to their own fresh K/V and to the cached K/V of every
other position.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from dllm import kernels

Array = jax.Array

PRESETS: dict[str, dict[str, Any]] = {
    # CPU scale: ~1.6M parameters at vocab 2048; trains in minutes on 2 cores.
    "tiny": dict(vocab_size=2048, hidden=128, layers=4, heads=4, kv_heads=2,
                 head_dim=32, mlp=384, rope_theta=10000.0),
    # ~100M parameters (GPT-2-small-like width) for benchmarks.
    "100m": dict(vocab_size=32768, hidden=768, layers=12, heads=12, kv_heads=4,
                 head_dim=64, mlp=2048, rope_theta=10000.0),
    # DiffuCoder-7B = Dream-7B = Qwen2.5-7B shape.
    "7b": dict(vocab_size=152064, hidden=3584, layers=28, heads=28, kv_heads=4,
               head_dim=128, mlp=18944, rope_theta=1e6, rms_eps=1e-6,
               tie_embeddings=False),
    # Released checkpoints, as in their config.json (dllm.convert reads those directly;
    # these let a config name the shape). Qwen2.5-Coder is causal (Stage 1 adapts it to
    # bidirectional); Dream and DiffuCoder are bidirectional; all shift logits.
    # Sources: apple/DiffuCoder-7B-Instruct config.json on huggingface.co; Qwen2.5-Coder
    # 0.5B / 1.5B / 7B: config.json copies in repos naming Qwen/Qwen2.5-Coder-* as their
    # _name_or_path (the Qwen/ originals were not in the search index); Dream-v0-Base-7B:
    # its config.json was not found, the values are its model card's (Qwen2.5-7B based,
    # 7.62B parameters) and a Dream-architecture config.json of the same family.
    "qwen2.5-coder-0.5b": dict(vocab_size=151936, hidden=896, layers=24, heads=14,
                               kv_heads=2, head_dim=64, mlp=4864, rope_theta=1e6,
                               rms_eps=1e-6, tie_embeddings=True, causal=True),
    "qwen2.5-coder-1.5b": dict(vocab_size=151936, hidden=1536, layers=28, heads=12,
                               kv_heads=2, head_dim=128, mlp=8960, rope_theta=1e6,
                               rms_eps=1e-6, tie_embeddings=True, causal=True),
    "qwen2.5-coder-7b": dict(vocab_size=152064, hidden=3584, layers=28, heads=28, kv_heads=4,
                             head_dim=128, mlp=18944, rope_theta=1e6, rms_eps=1e-6,
                             tie_embeddings=False, causal=True),
    "dream-7b": dict(vocab_size=152064, hidden=3584, layers=28, heads=28, kv_heads=4,
                     head_dim=128, mlp=18944, rope_theta=1e6, rms_eps=1e-6,
                     tie_embeddings=False),
    "diffucoder-7b": dict(vocab_size=152064, hidden=3584, layers=28, heads=28, kv_heads=4,
                          head_dim=128, mlp=18944, rope_theta=1e6, rms_eps=1e-6,
                          tie_embeddings=False),
}


_save = jax.checkpoint_policies.save_only_these_names
REMAT_POLICIES = {  # name -> what a layer keeps for the backward pass (see ModelConfig.remat)
    "none": None,
    "dots_attention": _save("proj", "attention"),
    "dots": _save("proj"),
    "attention": _save("attention"),
    "full": jax.checkpoint_policies.nothing_saveable,
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    mlp: int
    rope_theta: float = 10000.0
    rms_eps: float = 1e-6
    tie_embeddings: bool = False
    qkv_bias: bool = True
    # Dream convention: position i-1's output predicts token i.
    shift_logits: bool = True
    # Attention default for calls that pass no `lookahead`: False = bidirectional.
    causal: bool = False
    dtype: str = "float32"        # compute dtype: float32 | bfloat16
    param_dtype: str = "float32"  # storage dtype of parameters: float32 | bfloat16
    # What the backward pass recomputes, least memory last: none (keeps everything) |
    # dots_attention (keeps projection and attention outputs; recomputes elementwise ops) |
    # dots (keeps projection outputs; recomputes attention too) | attention (keeps
    # attention outputs; recomputes the projections and MLP) | full (keeps each layer's
    # input only; recomputes the layer).
    remat: str = "none"
    # Attention path: auto (cudnn on an NVIDIA GPU in bfloat16, pallas on a TPU, else xla)
    # | xla | cudnn | pallas. See dllm/kernels.py.
    attention: str = "auto"
    # Training loss: sequence positions per chunk of the output head's cross-entropy
    # (float32 logits exist for [B, chunk, V] at a time); 0 = the whole sequence at once.
    xent_chunk: int = 256

    def __post_init__(self):
        if self.heads % self.kv_heads:
            raise ValueError(f"model.heads={self.heads} must be a multiple of "
                             f"model.kv_heads={self.kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"model.head_dim={self.head_dim} must be even (RoPE)")
        for key, allowed in (("dtype", ("float32", "bfloat16")),
                             ("param_dtype", ("float32", "bfloat16")),
                             ("remat", tuple(REMAT_POLICIES)),
                             ("attention", kernels.ATTENTION)):
            if getattr(self, key) not in allowed:
                raise ValueError(f"model.{key}={getattr(self, key)!r}; allowed: {allowed}")


def config_from_dict(d) -> ModelConfig:
    """ModelConfig from a dict / ConfigDict; unknown keys fail naming the key."""
    d = dict(d)
    if "preset" in d:  # a config may carry the preset name for reference
        d.pop("preset")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise KeyError(f"unknown model config key(s) {unknown}; allowed: {sorted(fields)}")
    return ModelConfig(**d)


def preset(name: str, **overrides) -> dict[str, Any]:
    """The preset's fields (all of ModelConfig's) as a plain dict, with overrides."""
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; allowed: {sorted(PRESETS)}")
    fields = dataclasses.asdict(ModelConfig(**PRESETS[name]))
    fields.update(overrides)
    return dataclasses.asdict(config_from_dict(fields))


def param_count(cfg: ModelConfig) -> int:
    """Number of parameters (closed form)."""
    e, q, kv = cfg.hidden, cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    attn = e * q + 2 * e * kv + q * e + (q + 2 * kv if cfg.qkv_bias else 0)
    layer = attn + 3 * e * cfg.mlp + 2 * e
    head = 0 if cfg.tie_embeddings else e * cfg.vocab_size
    return cfg.layers * layer + cfg.vocab_size * e + head + e


def flops_per_token(cfg: ModelConfig, seq_len: int, training: bool = True) -> float:
    """Matmul FLOPs per token. Bidirectional attention sees all `seq_len` keys, so
    scores + values cost 4*S*H*D per token per layer (not halved as for causal).
    Training = forward + backward = 3x forward."""
    e, q, kv = cfg.hidden, cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    dense = cfg.layers * (e * q + 2 * e * kv + q * e + 3 * e * cfg.mlp) + e * cfg.vocab_size
    attention = cfg.layers * 4 * seq_len * q
    forward = 2 * dense + attention
    return 3 * forward if training else forward


def model_apply(model: nn.Module):
    """apply_fn(params, tokens, valid=None, lookahead="default", **kw) -> logits [B, S, V];
    kw are Transformer's keywords: cache, window_start, return_kv (cached decoding) and
    targets (-> (nll, argmax) [B, S] instead of logits: the ELBO losses). Make it once
    per model and reuse it: jitted callers take it as a static argument, so a new one
    recompiles."""
    def apply_fn(params, tokens, valid=None, lookahead="default", **kw):
        return model.apply({"params": params}, tokens, valid, lookahead=lookahead, **kw)
    return apply_fn


def abstract_params(cfg: ModelConfig):
    """The params as a tree of ShapeDtypeStructs boxed with their logical axes
    (nn.LogicallyPartitioned); nothing is allocated."""
    init = lambda: Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    return jax.eval_shape(init)["params"]


def slice_rows(x: Array, start: Array, width: int) -> Array:
    """x[b, start[b] : start[b] + width] for each row: [B, S, ...] -> [B, width, ...]."""
    return jax.vmap(lambda row, s: jax.lax.dynamic_slice_in_dim(row, s, width))(x, start)


def update_rows(x: Array, start: Array, new: Array) -> Array:
    """x with x[b, start[b] : start[b] + W] = new[b] for each row (new: [B, W, ...])."""
    return jax.vmap(lambda row, s, n: jax.lax.dynamic_update_slice_in_dim(row, n, s, 0))(
        x, start, new.astype(x.dtype))


class KVCache(NamedTuple):
    """Keys and values of every layer (RoPE applied) for a canvas of S positions.
    k, v: [L, B, S, kv_heads, head_dim]; valid: [B, S] bool (False = padding)."""
    k: Array
    v: Array
    valid: Array


# ----------------------------------------------------------------------------- layers

class Projection(nn.Module):
    """y = x . W (+ b): contracts the last len(in_shape) axes of x with W of shape
    in_shape + out_shape, created at that shape so its logical `axes` apply as is.
    The output is named "proj" for the remat policies."""
    in_shape: tuple
    out_shape: tuple
    axes: tuple
    cfg: ModelConfig
    use_bias: bool = False

    def setup(self):
        pd = jnp.dtype(self.cfg.param_dtype)
        self.kernel = self.param("kernel", nn.with_logical_partitioning(
            nn.initializers.normal(0.02), self.axes), self.in_shape + self.out_shape, pd)
        if self.use_bias:
            self.bias = self.param("bias", nn.with_logical_partitioning(
                nn.initializers.zeros, self.axes[len(self.in_shape):]), self.out_shape, pd)

    def __call__(self, x):
        dtype = jnp.dtype(self.cfg.dtype)
        y = kernels.dense(x.astype(dtype), self.kernel.astype(dtype), len(self.in_shape))
        if self.use_bias:
            y = y + self.bias.astype(dtype)
        return checkpoint_name(y, "proj")


class RMSNorm(nn.Module):
    eps: float
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                           (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)  # normalise in float32, as Qwen2 does
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale.astype(x.dtype) * x32.astype(x.dtype)


def rope(x: Array, positions: Array, theta: float) -> Array:
    """Rotary embedding, half-split layout (Qwen2 / HF `rotate_half`).
    x: [B, S, N, D]; positions: [B, S] int."""
    d = x.shape[-1]
    inv_freq = 1.0 / theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d)
    angles = positions[..., None].astype(jnp.float32) * inv_freq      # [B, S, D/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def attention_mask(valid: Array, lookahead, key_valid: Array | None = None) -> Array:
    """[B, 1, S, K] bool: query i sees key j iff both are valid tokens and the
    structure allows the pair. lookahead: None = bidirectional; an int (may be a
    traced scalar): j <= i + lookahead (0 = causal, values in between anneal causal
    -> full); or a bool array [S, S] / [B, S, S] of allowed (query, key) pairs.
    key_valid [B, K]: the keys' validity when they are not the queries (a window
    call; bidirectional)."""
    if key_valid is None:
        key_valid = valid
    mask = valid[:, None, :, None] & key_valid[:, None, None, :]
    if lookahead is None:
        return mask
    if jnp.ndim(lookahead) == 0:
        s = valid.shape[1]
        allowed = jnp.arange(s)[None, :] <= jnp.arange(s)[:, None] + lookahead
    else:
        allowed = jnp.asarray(lookahead, bool)
    # [S, S] -> [1, S, S] and [B, S, S] -> [B, 1, S, S]: broadcast over batch / heads.
    return mask & jnp.expand_dims(allowed, -3)


def attention_masks(cfg: ModelConfig, valid: Array, lookahead, key_valid: Array | None = None,
                    all_valid: bool = False) -> kernels.Mask:
    """The mask of one call in the forms `cfg.attention`'s path takes (see
    attention_mask; key_valid: the canvas's in a window call; all_valid: the caller
    knows statically that every token is valid)."""
    full = attention_mask(valid, lookahead, key_valid)
    key_valid = valid if key_valid is None else key_valid
    if lookahead is None:
        return kernels.Mask(full, valid, key_valid, dense=all_valid)
    if isinstance(lookahead, (int, np.integer)):  # static: a block-sparse mask for pallas
        return kernels.Mask(full, valid, key_valid, lookahead=int(lookahead))
    return kernels.Mask(full, valid, key_valid, static_band=False)


class Attention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, positions, mask: kernels.Mask, cached=None):
        """x: [B, W, E]. cached: None, or (k, v, start) for a window call: this
        layer's canvas K/V [B, S, kv_heads, D] and the window's first canvas index
        [B]. Returns (output [B, W, E], this call's (k, v)). The attention output
        is named "attention" for the remat policies."""
        cfg = self.cfg
        e = (cfg.hidden,)
        q = Projection(e, (cfg.heads, cfg.head_dim), ("embed", "heads", "head_dim"), cfg,
                       cfg.qkv_bias, name="q")(x)
        k = Projection(e, (cfg.kv_heads, cfg.head_dim), ("embed", "kv_heads", "head_dim"), cfg,
                       cfg.qkv_bias, name="k")(x)
        v = Projection(e, (cfg.kv_heads, cfg.head_dim), ("embed", "kv_heads", "head_dim"), cfg,
                       cfg.qkv_bias, name="v")(x)
        q = nn.with_logical_constraint(rope(q, positions, cfg.rope_theta),
                                       ("batch", "length", "act_heads", "head_dim"))
        k = rope(k, positions, cfg.rope_theta)
        fresh = (k, v)
        if cached is not None:  # the window's fresh K/V replace the cached ones there
            cache_k, cache_v, start = cached
            k, v = update_rows(cache_k, start, k), update_rows(cache_v, start, v)
        # GQA: every path repeats the K/V heads itself.
        out = kernels.attention(q, k, v, mask, kernels.resolve(cfg.attention, cfg.dtype))
        out = nn.with_logical_constraint(checkpoint_name(out, "attention"),
                                         ("batch", "length", "act_heads", "head_dim"))
        out = Projection((cfg.heads, cfg.head_dim), (cfg.hidden,),
                         ("heads", "head_dim", "embed"), cfg, name="o")(out)
        return out, fresh


class MLP(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        e, m = (cfg.hidden,), (cfg.mlp,)
        gate = Projection(e, m, ("embed", "mlp"), cfg, name="gate")(x)
        up = Projection(e, m, ("embed", "mlp"), cfg, name="up")(x)
        h = nn.with_logical_constraint(nn.silu(gate) * up, ("batch", "length", "act_mlp"))
        return Projection(m, e, ("mlp", "embed"), cfg, name="down")(h)


class Block(nn.Module):
    """Pre-norm decoder block; scanned over layers (carry = residual stream; the
    per-layer output is this layer's (k, v) when `return_kv`, else None)."""
    cfg: ModelConfig
    return_kv: bool = False

    @nn.compact
    def __call__(self, x, positions, mask, cached_kv, window_start):
        cfg = self.cfg
        pd = jnp.dtype(cfg.param_dtype)
        cached = None if cached_kv is None else (*cached_kv, window_start)
        h, kv = Attention(cfg, name="attn")(RMSNorm(cfg.rms_eps, pd, name="attn_norm")(x),
                                            positions, mask, cached)
        x = x + h
        x = x + MLP(cfg, name="mlp")(RMSNorm(cfg.rms_eps, pd, name="mlp_norm")(x))
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
        return x, (kv if self.return_kv else None)



class Transformer(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens: Array, valid: Array | None = None,
                 positions: Array | None = None, lookahead="default",
                 cache: KVCache | None = None, window_start: Array | None = None,
                 return_kv: bool = False, targets: Array | None = None):
        """tokens: [B, S] int; valid: [B, S] bool (False = padding, excluded from
        attention; default all True); positions: [B, S] int (default cumsum(valid)-1,
        so the first real token of a left-padded row has position 0); lookahead:
        None (bidirectional), 0 (causal) or an int / traced scalar in between, or a
        bool array [S, S] / [B, S, S] of allowed (query, key) pairs (see
        `attention_mask`; ANDed with the padding mask); "default" = the config's
        `causal`. Returns logits [B, S, V] float32, shifted (position i predicts
        token i) when cfg.shift_logits.

        Window call: `cache` holds the K/V of a whole canvas [B, S_c] and `tokens`
        are its positions window_start[b] ... window_start[b] + S - 1 ([B] int; the
        logits shift stays within the window); `valid` and `positions` default to
        the canvas's there; attention is bidirectional. With `return_kv`, returns
        (logits, KVCache of this call's tokens).

        targets: [B, S] int: returns (nll [B, S] float32, argmax [B, S] int32) of the
        targets under the (shifted) logits instead of the logits, computed in chunks
        of `cfg.xent_chunk` positions (see kernels.cross_entropy)."""
        cfg = self.cfg
        if isinstance(lookahead, str):
            lookahead = 0 if cfg.causal else None
        if cache is None:
            all_valid = valid is None
            if all_valid:
                valid = jnp.ones(tokens.shape, bool)
            if positions is None:
                positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
            mask = attention_masks(cfg, valid, lookahead, all_valid=all_valid)
        else:
            if lookahead is not None:
                raise ValueError("a window call with a KV cache is bidirectional only")
            if valid is None:
                valid = slice_rows(cache.valid, window_start, tokens.shape[1])
            if positions is None:
                canvas_positions = jnp.maximum(jnp.cumsum(cache.valid, axis=1) - 1, 0)
                positions = slice_rows(canvas_positions, window_start, tokens.shape[1])
            mask = attention_masks(cfg, valid, None, key_valid=cache.valid)

        embed = nn.Embed(cfg.vocab_size, cfg.hidden, name="embed",
                         dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
                         embedding_init=nn.with_logical_partitioning(
                             nn.initializers.normal(0.02), ("vocab", "embed")))
        x = embed(tokens)
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))

        block = Block
        if cfg.remat != "none":
            block = nn.remat(Block, prevent_cse=False, policy=REMAT_POLICIES[cfg.remat])
        cached_kv = None if cache is None else (cache.k, cache.v)
        layers = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                         in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast),
                         length=cfg.layers, metadata_params={nn.PARTITION_NAME: "layers"})(
                             cfg, return_kv, name="layers")
        x, kv = layers(x, positions, mask, cached_kv, window_start)
        x = RMSNorm(cfg.rms_eps, jnp.dtype(cfg.param_dtype), name="final_norm")(x)

        head = None if cfg.tie_embeddings else Projection(
            (cfg.hidden,), (cfg.vocab_size,), ("embed", "vocab"), cfg, name="lm_head")
        if targets is not None:
            return _scores(cfg, x, embed.embedding if head is None else head.kernel, targets)
        logits = embed.attend(x) if head is None else head(x)
        logits = nn.with_logical_constraint(logits.astype(jnp.float32),
                                            ("batch", "length", "act_vocab"))
        if cfg.shift_logits:
            logits = jnp.concatenate([logits[:, :1], logits[:, :-1]], axis=1)
        if return_kv:
            return logits, KVCache(*kv, valid)
        return logits


def _scores(cfg: ModelConfig, x: Array, kernel: Array, targets: Array):
    """(nll, argmax) [B, S] of `targets` under the output head `kernel` ([E, V], or the
    tied embedding [V, E]) applied to the final hidden states x [B, S, E], shifted
    as the logits are."""
    if cfg.shift_logits:
        x = jnp.concatenate([x[:, :1], x[:, :-1]], axis=1)
    dtype = jnp.dtype(cfg.dtype)
    return kernels.cross_entropy(x.astype(dtype), kernel.astype(dtype), targets, cfg.xent_chunk,
                                 vocab_axis=0 if cfg.tie_embeddings else 1)
