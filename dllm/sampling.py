"""Diffusion decoding: every published unmasking rule, block and parallel decoding,
and a KV cache, as one jitted `lax.while_loop` over a batch.

The canvas is the (left-padded) prompt followed by `max_new_tokens` mask tokens;
mask tokens inside the prompt are generated too (infilling: give a prefix, a hole
of masks and a suffix). Each step runs the model, proposes a token for every
masked position of the row's current block and commits some of them:

  which      the rule's confidence (`alg`) ranks the block's masked positions;
             the top k are committed, or k are drawn without replacement from
             softmax(confidence / alg_temp). `origin` instead reveals each masked
             position with probability 1 - s/t.
  how many   the schedule over the block's steps (Dream: floor(n (1 - s/t)) on the
             grid linspace(1, eps, steps + 1); LLaDA: an even split), or Fast-dLLM's
             parallel rules (every position whose token probability exceeds
             `threshold`; or the largest n with (n + 1)(1 - c_n) < `factor`),
             always at least one. A parallel rule also decides which: the k
             positions with the most probable proposals, whatever `alg` ranks by.

Blocks of `block_length` positions start at the row's first masked position; the
current block is the one holding the leftmost masked position, and positions
right of it are never committed. `steps` are split evenly across the blocks.
Each row progresses on its own (its own block, step count and completion; with
EOS, a row is done once nothing before its first generated EOS is masked), so a
row decodes the same alone as in a batch, and the loop ends when every row is done.

With `cache`, the model runs on the current block only, attending to keys and
values of the rest of the canvas cached when the row entered the block
(Fast-dLLM's dual cache; `cache_refresh` refreshes it more often, 1 = exactly).

    out = generate(params, prompts, rng, SampleConfig(alg="entropy"),
                   apply_fn=model_apply(model), mask_id=tok.mask_id, eos_id=tok.eos_id,
                   pad_id=tok.pad_id, valid=prompt_valid)
    out.tokens, out.order        # [B, P + N] each

Text in, text out (what every caller uses: the end-of-training sample, the sample
CLI, evaluation, GRPO rollouts, the analyses):

    gen = generate_text(params, ["def fib(n):"], rng, cfg, apply_fn=run.apply_fn,
                        tokenizer=run.tokenizer)
    gen.texts                    # completions, cut at the first pad / EOS / <|im_end|>
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dllm.kernels import argmax
from dllm.model import KVCache, slice_rows, update_rows

Array = jax.Array

ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy", "low_confidence", "random")
SCHEDULES = ("dream", "even")
PARALLEL = ("none", "threshold", "factor")
# Keys a stage's `config.sample` may hold that are not decoding settings.
NON_DECODING_KEYS = ("prompt",)


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    max_new_tokens: int = 64    # mask tokens appended to the prompt (0: fill the prompt's masks)
    steps: int = 0              # denoising steps in all, split evenly across blocks;
    #                             0 = one per generated position (DiffuCoder: 256 in 256)
    # Which positions to unmask: origin (Dream: each w.p. 1 - s/t) | maskgit_plus (top-1
    # prob) | topk_margin (top-1 - top-2 prob) | entropy (negative entropy; DiffuCoder)
    # | low_confidence (LLaDA: untempered prob of the token) | random (LLaDA).
    alg: str = "entropy"
    schedule: str = "dream"     # tokens per step: dream (floor(n (1 - s/t))) | even (LLaDA)
    eps: float = 1e-3           # end of Dream's time grid linspace(1, eps, steps + 1)
    temperature: float = 0.0    # token sampling; 0 = greedy
    top_p: float = 1.0          # nucleus filter, applied after temperature; 1 = off
    top_k: int = 0              # top-k filter, applied after top-p; 0 = off
    alg_temp: float = 0.0       # > 0: positions sampled from softmax(confidence / alg_temp)
    block_length: int = 0       # semi-autoregressive blocks; 0 = one block
    # How many per step: none (the schedule) | threshold | factor (Fast-dLLM; `steps`
    # and `schedule` are then unused, and the token probability, not `alg`, picks which).
    parallel: str = "none"
    threshold: float = 0.9      # parallel=threshold: commit every token with prob > threshold
    factor: float = 1.0         # parallel=factor: commit the largest n with (n+1)(1-c_n) < factor
    suppress_eos: bool = False  # EOS proposals rank last (LLaDA's fix for early EOS)
    cache: bool = False         # Fast-dLLM dual KV cache; needs block_length > 0
    cache_refresh: int = 0      # 0: refresh the cache once per block; n: every n steps too

    def __post_init__(self):
        for key, allowed in (("alg", ALGS), ("schedule", SCHEDULES), ("parallel", PARALLEL)):
            if getattr(self, key) not in allowed:
                raise ValueError(f"sample.{key}={getattr(self, key)!r}; allowed: {allowed}")
        if self.steps < 0 or self.max_new_tokens < 0:
            raise ValueError("sample.steps and sample.max_new_tokens must be >= 0")
        if self.alg == "origin" and (self.parallel != "none" or self.suppress_eos):
            raise ValueError("sample.alg='origin' reveals at random: it takes no "
                             "sample.parallel rule and no sample.suppress_eos")
        if self.parallel != "none" and self.alg_temp > 0:
            raise ValueError("sample.parallel commits the most probable proposals: it takes "
                             "no sample.alg_temp")
        if self.cache and self.block_length <= 0:
            raise ValueError("sample.cache needs sample.block_length > 0")


def sample_config_from_dict(d) -> SampleConfig:
    """SampleConfig from a dict / ConfigDict; NON_DECODING_KEYS are skipped and any
    other unknown key fails naming the key."""
    d = {k: v for k, v in dict(d).items() if k not in NON_DECODING_KEYS}
    fields = {f.name for f in dataclasses.fields(SampleConfig)}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise KeyError(f"unknown sample config key(s) {unknown}; allowed: {sorted(fields)}")
    return SampleConfig(**d)


class Decoded(NamedTuple):
    tokens: Array      # [B, S] int: the decoded canvas; pad after a row's first generated EOS
    order: Array       # [B, S] int32: step at which each position was unmasked; -1 = never
    #                    (prompt, or still masked when its row stopped at EOS)
    confidence: Array  # [B, S] float32: the rule's confidence at commit; nan where order = -1
    steps: Array       # [B] int32: model calls until the row was done
    refreshes: Array   # [] int32: full forwards made to refresh the KV cache
    trace: Array | None = None  # generate(trace=True): [T, B, S] float32, the rule's
    #                    confidence at every masked position the model scored at loop
    #                    step t (nan elsewhere, and after the last step); T = the loop's bound


def history(out: Decoded, mask_id: int) -> Array:
    """[T, B, S] canvas after each step t (T = last step + 1), rebuilt from the
    final tokens and the order: a position shows its token from its step on (the
    prompt, and pads never unmasked, throughout). Not jittable (T from the data)."""
    steps = jnp.arange(int(out.order.max()) + 1)[:, None, None]
    shown = (out.order[None] < 0) | (out.order[None] <= steps)
    return jnp.where(shown, out.tokens[None], mask_id)


# ----------------------------------------------------------------------------- proposals

def _nucleus_cutoff(probs: Array, top_p: float) -> Array:
    """[..., 1] the smallest kept probability of probs [..., V]: the least value v
    among them whose mass above, sum(p > v), is <= top_p.

    Found by search on float32 bit patterns (nonnegative floats order as their bits):
    each round cuts the bracket in four with three masked sums over the vocabulary,
    which XLA fuses into one read (~15 rounds). No sort: XLA:GPU's top_k and sort are
    radix sorts of the whole vocabulary, slower than the model's forward at the 152k
    vocabulary (benchmarks/RESULTS.md, the decode profile)."""
    probs = probs.astype(jnp.float32)
    bits = jax.lax.bitcast_convert_type(probs, jnp.int32)

    def quarter(_, bounds):  # mass_above(lo) > top_p >= mass_above(hi)
        lo, hi = bounds
        q, r = jnp.divmod(hi - lo, 4)
        cuts = [lo + i * q + jnp.minimum(i, r) for i in (1, 2, 3)]
        for cut in cuts:
            ok = jnp.sum(jnp.where(bits > cut[..., None], probs, 0.0), -1) <= top_p
            lo = jnp.where(ok, lo, jnp.maximum(lo, cut))
            hi = jnp.where(ok, jnp.minimum(hi, cut), hi)
        return lo, hi

    one = int(np.float32(1.0).view(np.int32))  # no probability lies above it
    lo = jnp.full(probs.shape[:-1], -1, jnp.int32)  # above -1: all the mass, > top_p
    rounds = ((one + 1).bit_length() + 1) // 2  # a quarter of the bracket per round
    _, hi = jax.lax.fori_loop(0, rounds, quarter, (lo, jnp.full(probs.shape[:-1], one, jnp.int32)))
    return jax.lax.bitcast_convert_type(hi, jnp.float32)[..., None]


def _top_p(z: Array, top_p: float) -> Array:
    """Keep the smallest set of tokens whose probability mass reaches top_p (Dream's
    rule: a token stays if the mass before it, in descending order, is <= top_p);
    ties at the cut stay. The same set as sorting gives, up to float rounding of a
    mass within ~1e-7 of top_p."""
    if top_p >= 1.0:
        return z
    probs = jax.nn.softmax(z, axis=-1)
    return jnp.where(probs >= _nucleus_cutoff(probs, top_p), z, -jnp.inf)


def _top_k(z: Array, top_k: int) -> Array:
    if top_k <= 0:
        return z
    kth = jax.lax.top_k(z, top_k)[0][..., -1:]
    return jnp.where(z >= kth, z, -jnp.inf)


def _confidence(alg: str, logits: Array, z: Array, lse: Array, prob: Array, x0: Array,
                key) -> Array:
    """The rule's score per position [B, W] (higher = unmask sooner). z: the sampling
    logits [B, W, V] (tempered, filtered) and lse their logsumexp [B, W]; logits:
    untempered. Reductions over V only: no [B, W, V] probabilities are stored."""
    if alg == "maskgit_plus":
        return prob
    if alg == "topk_margin":
        top1 = jnp.max(z, -1)
        is_top1 = jnp.arange(z.shape[-1]) == argmax(z, top1)[..., None]
        top2 = jnp.max(jnp.where(is_top1, -jnp.inf, z), -1)
        return jnp.exp(top1 - lse) - jnp.exp(top2 - lse)
    if alg == "entropy":
        logp = z - lse[..., None]
        return jnp.sum(jnp.where(jnp.isfinite(logp), jnp.exp(logp) * logp, 0.0), -1)
    if alg == "low_confidence":  # LLaDA: probability under the untempered logits
        return jnp.exp(_take(logits, x0) - jax.nn.logsumexp(logits, -1))
    if alg == "random":
        return _draw(key, jax.random.uniform)
    return jnp.zeros(x0.shape)  # origin reveals at random; no ranking


def position_keys(key, shape) -> Array:
    """[B, W] PRNG keys, one per row and position: `key` itself when it already is
    one per position (the sampler passes keys of canvas positions, so a position's
    draws are the same whichever window it is proposed in), else derived from it."""
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):  # a raw uint32 key (PRNGKey)
        key = jax.random.wrap_key_data(key)
    if key.shape == tuple(shape):
        return key
    rows, cols = jnp.indices(shape)
    return jax.vmap(jax.vmap(lambda r, c: jax.random.fold_in(jax.random.fold_in(key, r), c)))(
        rows, cols)


def _draw(keys: Array, fn) -> Array:
    """fn(key) at every position of a [B, W] array of keys."""
    return jax.vmap(jax.vmap(fn))(keys)


def _take(x: Array, idx: Array) -> Array:
    """x[..., idx] along the last axis: [B, W, V], [B, W] -> [B, W]."""
    return jnp.take_along_axis(x, idx[..., None], axis=-1)[..., 0]


def propose(logits: Array, key, cfg: SampleConfig, mask_id: int, eos_id: int | None):
    """logits [B, W, V] -> (x0 [B, W] proposed tokens, prob [B, W] their probability
    under the sampling distribution (temperature, then top-p, then top-k), confidence
    [B, W] the rule's score). The mask token is never proposed. key: one PRNG key,
    or one per position [B, W] (see position_keys)."""
    keys = position_keys(key, logits.shape[:2])
    k_sample, k_rule = (_draw(keys, lambda k: jax.random.fold_in(k, i)) for i in (0, 1))
    logits = logits.at[..., mask_id].set(-jnp.inf)
    z = logits / cfg.temperature if cfg.temperature > 0 else logits
    z = _top_k(_top_p(z, cfg.top_p), cfg.top_k)
    z_max = jnp.max(z, -1)  # finite: the vocabulary is never all filtered
    lse = z_max + jnp.log(jnp.sum(jnp.exp(z - z_max[..., None]), -1))
    if cfg.temperature > 0:  # Gumbel-max: a sample of softmax(z)
        x0 = argmax(z + _draw(k_sample, lambda k: jax.random.gumbel(k, z.shape[-1:])))
        prob = jnp.exp(_take(z, x0) - lse)
    else:  # z[x0] is z_max: no gather
        x0 = argmax(z, z_max)
        prob = jnp.exp(z_max - lse)
    confidence = _confidence(cfg.alg, logits, z, lse, prob, x0, k_rule)
    if cfg.suppress_eos:  # rank EOS last and let it count for no parallel commit
        is_eos = x0 == eos_id
        confidence = jnp.where(is_eos, -jnp.inf, confidence)
        prob = jnp.where(is_eos, 0.0, prob)
    return x0, prob, confidence


# ----------------------------------------------------------------------------- unmasking

def reveal_fraction(j: Array, steps: Array, eps: float) -> Array:
    """Dream's 1 - s/t at step j of `steps` on the grid linspace(1, eps, steps + 1);
    1 at the last step. j, steps: [B] int -> [B] float32."""
    t = 1.0 - (1.0 - eps) * j / steps
    s = 1.0 - (1.0 - eps) * (j + 1) / steps
    return jnp.where(j >= steps - 1, 1.0, 1.0 - s / t)


def how_many(cfg: SampleConfig, eligible: Array, prob: Array, j: Array, steps: Array) -> Array:
    """Tokens to commit per row [B] (at most the eligible count n). eligible, prob:
    [B, W]; j: [B] step within the block; steps: [B] steps per block."""
    n = eligible.sum(-1)
    if cfg.parallel == "threshold":
        k = jnp.maximum(1, jnp.sum(eligible & (prob > cfg.threshold), -1))
    elif cfg.parallel == "factor":  # n-th largest prob c_n: (n + 1)(1 - c_n) < factor
        c = -jnp.sort(-jnp.where(eligible, prob, -jnp.inf), axis=-1)
        rank = jnp.arange(1, c.shape[-1] + 1)
        k = jnp.maximum(1, jnp.sum((rank + 1) * (1.0 - c) < cfg.factor, -1))
    elif cfg.schedule == "dream":
        k = jnp.floor(n * reveal_fraction(j, steps, cfg.eps)).astype(n.dtype)
    else:  # even: LLaDA's base + remainder split == ceil(remaining / steps left)
        k = -(-n // (steps - j))
    return jnp.minimum(k, n)


def select(cfg: SampleConfig, confidence: Array, eligible: Array, k: Array, frac: Array,
           key) -> Array:
    """[B, W] bool: the positions to commit. The k best eligible by confidence (or
    k drawn without replacement from softmax(confidence / alg_temp), by Gumbel
    top-k); `origin`: each eligible position with probability frac [B]. key: one
    PRNG key, or one per position [B, W] (see position_keys)."""
    keys = position_keys(key, eligible.shape)
    if cfg.alg == "origin":
        return eligible & (_draw(keys, jax.random.uniform) < frac[:, None])
    score = confidence
    if cfg.alg_temp > 0:
        score = confidence / cfg.alg_temp + _draw(keys, jax.random.gumbel)
    # Eligible first, then by score, ties to the left; rank = inverse permutation.
    by_rank = jnp.lexsort((-score, ~eligible), axis=-1)
    rank = jnp.argsort(by_rank, axis=-1)
    return eligible & (rank < k[:, None])


# ----------------------------------------------------------------------------- the loop

class _State(NamedTuple):
    tokens: Array      # [B, S]
    order: Array       # [B, S] int32
    confidence: Array  # [B, S] float32
    block: Array       # [B] int32: the row's current block
    j: Array           # [B] int32: steps the row has spent in it
    done: Array        # [B] bool
    steps: Array       # [B] int32
    i: Array           # [] int32: loop step
    refreshes: Array   # [] int32
    cache: KVCache | None
    trace: Array | None  # [T, B, S] float32 when tracing


def _first_eos(tokens: Array, generated: Array, eos_id: int) -> Array:
    """[B, 1] position of the row's first generated EOS (S if none)."""
    eos = (tokens == eos_id) & generated
    return jnp.where(eos.any(-1), jnp.argmax(eos, -1), tokens.shape[1])[:, None]


def _row_done(tokens: Array, generated: Array, mask_id: int, eos_id: int | None) -> Array:
    """[B] bool: nothing masked before the row's first generated EOS (or at all)."""
    masked = (tokens == mask_id) & generated
    if eos_id is not None:
        masked = masked & (jnp.arange(tokens.shape[1]) < _first_eos(tokens, generated, eos_id))
    return ~masked.any(-1)


def _block_layout(generated: Array, block_length: int, steps: int):
    """Per row: the first generated position and the steps per block [B] (`steps`,
    or 0 = the row's generated count, split evenly across the blocks spanning the
    generated positions; at least 1)."""
    s = generated.shape[1]
    pos = jnp.arange(s)
    first = jnp.min(jnp.where(generated, pos, s), -1)
    last = jnp.max(jnp.where(generated, pos, -1), -1)
    blocks = jnp.maximum(1, -(-(last - first + 1) // block_length))
    total = steps if steps > 0 else generated.sum(-1)
    return first, jnp.maximum(1, total // blocks)


def _window_logits(params, apply_fn, st: _State, valid, start, width, refresh):
    """Logits [B, width, V] for the canvas positions start[b] ... start[b] + width - 1,
    and the cache: refreshed by a full forward for the rows in `refresh` [B] (with a
    cache), or the full forward's logits sliced at the window (without)."""
    if st.cache is None:
        logits = apply_fn(params, st.tokens, valid)
        if width == st.tokens.shape[1]:
            return logits, None, 0
        return slice_rows(logits, start, width), None, 0

    def fresh(cache):
        _, kv = apply_fn(params, st.tokens, valid, return_kv=True)
        rows = refresh[None, :, None, None, None]
        return cache._replace(k=jnp.where(rows, kv.k, cache.k), v=jnp.where(rows, kv.v, cache.v))

    cache = jax.lax.cond(refresh.any(), fresh, lambda c: c, st.cache)
    logits = apply_fn(params, slice_rows(st.tokens, start, width),
                      slice_rows(valid, start, width), cache=cache, window_start=start)
    return logits, cache, refresh.any().astype(jnp.int32)


def _step(st: _State, params, rng, cfg: SampleConfig, apply_fn, valid, generated, first,
          block_length, steps_per_block, ids):
    """One denoising step for every row that is not done."""
    mask_id, eos_id = ids
    s = st.tokens.shape[1]
    width = min(block_length + 1, s)  # + the position left of the block: the logits shift
    masked = (st.tokens == mask_id) & generated
    leftmost = jnp.where(masked.any(-1), jnp.argmax(masked, -1), s)
    block = (leftmost - first) // block_length
    start = first + block * block_length
    j = jnp.where(block == st.block, st.j, 0)
    active = ~st.done
    window_start = jnp.clip(start - 1, 0, s - width)
    window = window_start[:, None] + jnp.arange(width)
    refresh = active & ((j == 0) if cfg.cache_refresh == 0 else (j % cfg.cache_refresh == 0))
    logits, cache, refreshed = _window_logits(params, apply_fn, st, valid, window_start, width,
                                              refresh)

    at = lambda x: slice_rows(x, window_start, width)
    # Keys of canvas positions: the same draws whatever the window's width.
    k_propose, k_select = (at(position_keys(k, st.tokens.shape))
                           for k in jax.random.split(jax.random.fold_in(rng, st.i)))
    x0, prob, confidence = propose(logits, k_propose, cfg, mask_id, eos_id)
    eligible = at(masked) & (window < (start + block_length)[:, None]) & active[:, None]
    k = how_many(cfg, eligible, prob, j, steps_per_block)
    frac = reveal_fraction(j, steps_per_block, cfg.eps)
    # Fast-dLLM: a parallel rule counts and chooses by the proposal's probability.
    rank_by = confidence if cfg.parallel == "none" else prob
    commit = select(cfg, rank_by, eligible, k, frac, k_select)

    put = lambda x, new: update_rows(x, window_start, jnp.where(commit, new, at(x)))
    tokens = put(st.tokens, x0)
    trace = st.trace
    if trace is not None:  # every scored masked position's confidence, before the commit
        scored = jnp.where(at(masked) & active[:, None], confidence, jnp.nan)
        trace = trace.at[st.i].set(update_rows(jnp.full(st.tokens.shape, jnp.nan), window_start,
                                               scored))
    return _State(tokens=tokens, order=put(st.order, st.i),
                  confidence=put(st.confidence, confidence), block=block, j=j + 1,
                  done=_row_done(tokens, generated, mask_id, eos_id), steps=st.steps + active,
                  i=st.i + 1, refreshes=st.refreshes + refreshed, cache=cache, trace=trace)


@functools.partial(jax.jit, static_argnames=("cfg", "apply_fn", "mask_id", "pad_id", "eos_id",
                                             "span", "trace"))
def _generate(params, prompts, valid, rng, cfg, apply_fn, mask_id, pad_id, eos_id,
              span, trace=False) -> Decoded:
    b, p = prompts.shape
    n = cfg.max_new_tokens
    tokens = jnp.concatenate([prompts, jnp.full((b, n), mask_id, prompts.dtype)], axis=1)
    valid = jnp.concatenate([valid, jnp.ones((b, n), bool)], axis=1)
    generated = (tokens == mask_id) & valid
    block_length = cfg.block_length or span  # 0: one block
    first, steps_per_block = _block_layout(generated, block_length, cfg.steps)
    cache = None
    if cfg.cache:
        kv = jax.eval_shape(lambda: apply_fn(params, tokens, valid, return_kv=True)[1])
        cache = KVCache(jnp.zeros(kv.k.shape, kv.k.dtype), jnp.zeros(kv.v.shape, kv.v.dtype),
                        valid)
    zero = jnp.zeros((b,), jnp.int32)
    # Each row finishes within `steps` (schedule) or within its masked count (parallel).
    max_steps = max(cfg.steps, p + n)
    st = _State(tokens=tokens, order=jnp.full(tokens.shape, -1, jnp.int32),
                confidence=jnp.full(tokens.shape, jnp.nan, jnp.float32), block=zero - 1,
                j=zero, done=_row_done(tokens, generated, mask_id, eos_id), steps=zero,
                i=jnp.int32(0), refreshes=jnp.int32(0), cache=cache,
                trace=jnp.full((max_steps, *tokens.shape), jnp.nan) if trace else None)
    step = functools.partial(_step, params=params, rng=rng, cfg=cfg, apply_fn=apply_fn,
                             valid=valid, generated=generated, first=first,
                             block_length=block_length, steps_per_block=steps_per_block,
                             ids=(mask_id, eos_id))
    st = jax.lax.while_loop(lambda st: (st.i < max_steps) & ~st.done.all(), step, st)
    tokens = st.tokens
    if eos_id is not None:  # everything generated after the first EOS becomes pad
        after = jnp.arange(tokens.shape[1]) > _first_eos(tokens, generated, eos_id)
        tokens = jnp.where(generated & after, pad_id, tokens)
    return Decoded(tokens, st.order, st.confidence, st.steps, st.refreshes, st.trace)


def _generated_span(prompts, valid, n: int, mask_id: int) -> int:
    """Canvas positions from the earliest generated one (a mask token in a prompt, else
    the first new token) to the end: the one-block decoding window, so that no prompt
    position before it is proposed for. P + n when the prompts are traced."""
    p = prompts.shape[1]
    if isinstance(prompts, jax.core.Tracer) or isinstance(valid, jax.core.Tracer):
        return p + n
    holes = np.asarray((prompts == mask_id) & valid).any(0)
    return max(1, p + n - (int(holes.argmax()) if holes.any() else p))


def generate(params, prompts: Array, rng: Array, cfg: SampleConfig, *, apply_fn: Callable,
             mask_id: int, pad_id: int | None = None, eos_id: int | None = None,
             valid: Array | None = None, trace: bool = False) -> Decoded:
    """Decode `cfg.max_new_tokens` tokens after each prompt, and any mask tokens in
    the prompts (infilling). prompts: [B, P] int, left-padded where `valid` [B, P]
    bool is False (default all valid). apply_fn(params, tokens, valid, **kw) ->
    logits [B, S, V] (shifted as the model is trained; with cfg.cache it must take
    `Transformer`'s cache/window_start/return_kv keywords, as `model.model_apply` does).
    eos_id: None = no EOS handling; else a row stops once nothing before its first
    generated EOS is masked, and what follows is returned as pad_id (default eos_id).
    trace: also return Decoded.trace, the confidence of every masked position at every
    step (for heatmaps; a [T, B, P + N] buffer, so off by default).
    Returns Decoded: tokens and order [B, P + N] first. Jitted; cfg, apply_fn, the ids
    and trace are static (reuse one apply_fn to avoid recompiling)."""
    if valid is None:
        valid = jnp.ones(prompts.shape, bool)
    if cfg.suppress_eos and eos_id is None:
        raise ValueError("sample.suppress_eos needs an eos_id")
    return _generate(params, prompts, valid, rng, cfg=cfg, apply_fn=apply_fn, mask_id=mask_id,
                     span=_generated_span(prompts, valid, cfg.max_new_tokens, mask_id),
                     pad_id=eos_id if pad_id is None else pad_id, eos_id=eos_id, trace=trace)


def encode_prompts(tok, texts, suffix: str = "", n: int = 0, multiple: int = 1,
                   max_len: int | None = None, truncate: bool = False):
    """Left-padded canvases [B, P] int32 and valid [B, P] bool from prompt strings: the
    prompt ids, plus `n` mask tokens and the `suffix` ids when infilling (suffix set).
    P is rounded up to `multiple` (fewer distinct shapes: fewer recompiles).
    max_len: the model's context; a prompt that leaves too little room for the `n`
    generated tokens (and the suffix) raises ValueError naming it, or with `truncate`
    loses its start (left truncation)."""
    suffix_ids = tok.encode(suffix) if suffix else []
    hole = [tok.mask_id] * n + suffix_ids if suffix else []
    rows = [tok.encode(t) for t in texts]
    if max_len is not None:
        room = max_len - n - len(suffix_ids)
        if room < 1:
            raise ValueError(f"{n} new tokens{' and the suffix' if suffix else ''} leave no room "
                             f"for a prompt in the model's context of {max_len} tokens")
        for i, row in enumerate(rows):
            if len(row) > room and not truncate:
                raise ValueError(
                    f"prompt {i} is {len(row)} tokens; with {n} new tokens"
                    f"{' and the suffix' if suffix else ''} it exceeds the model's context of "
                    f"{max_len} tokens; shorten it, generate fewer tokens, or truncate "
                    f"prompts (keeping their last {room} tokens)")
        rows = [row[-room:] for row in rows]
    rows = [row + hole for row in rows]
    return left_pad(rows, -(-max(map(len, rows)) // multiple) * multiple, tok.pad_id)


def left_pad(rows, width: int, pad_id: int):
    """Token-id lists -> (tokens [B, width] int32, valid [B, width] bool): each row
    left-padded to `width`, a longer row cut to its last `width` ids (left truncation)."""
    tokens = np.full((len(rows), width), pad_id, np.int32)
    valid = np.zeros((len(rows), width), bool)
    for i, row in enumerate(rows):
        row = row[len(row) - min(len(row), width):]
        tokens[i, width - len(row):] = row
        valid[i, width - len(row):] = True
    return tokens, valid


def completion_texts(tok, tokens, start: int, stop_ids, end: int | None = None) -> list[str]:
    """The generated text of each row of `tokens` [B, S]: positions start .. end - 1
    (default: to the end), cut at the first of `stop_ids` (pad, EOS, <|im_end|>, ...)."""
    out = []
    for row in np.asarray(tokens)[:, start:end].tolist():
        cut = next((i for i, t in enumerate(row) if t in stop_ids), len(row))
        out.append(tok.decode(row[:cut]))
    return out


class TextGeneration(NamedTuple):
    texts: list[str]          # completions, cut at the first pad / EOS / <|im_end|>
    prompts: np.ndarray       # [B, P] int32: the left-padded prompt ids
    prompt_valid: np.ndarray  # [B, P] bool: False on the left padding
    decoded: Decoded          # tokens [B, P + N] (completion ids: tokens[:, P:]), order, ...


def stop_ids(tok) -> set[int]:
    """Token ids a completion ends at: pad, EOS and the end of a chat turn."""
    return {tok.pad_id, tok.eos_id, tok.im_end_id}


def generate_text(params, texts, rng: Array, cfg: SampleConfig, *, apply_fn: Callable, tokenizer,
                  chat: bool = False, suffix: str = "", multiple: int = 32,
                  max_len: int | None = None, truncate_prompts: bool = False,
                  trace: bool = False) -> TextGeneration:
    """Complete each text: the texts (each wrapped as a user turn in the chat template
    with an open assistant turn when `chat`) are encoded into one left-padded batch
    (width rounded up to `multiple`: fewer shapes, fewer compiles), decoded with `cfg`
    (a row stops at its first EOS; pads after it) and cut at stop_ids per row.
    With a `suffix`, cfg.max_new_tokens masks go between each text and the suffix
    (infilling) and the completion is what fills them. max_len: the model's context
    (`runs.Run.max_len`): a longer prompt + completion raises ValueError, or with
    `truncate_prompts` the prompt loses its start (see encode_prompts). trace: see
    `generate`."""
    if chat:
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": t}], True)
                 for t in texts]
    prompts, valid = encode_prompts(tokenizer, texts, suffix, cfg.max_new_tokens, multiple,
                                    max_len, truncate_prompts)
    start, end = prompts.shape[1], None
    if suffix:  # the hole is inside the canvas: nothing appended
        end = start - len(tokenizer.encode(suffix))
        start = end - cfg.max_new_tokens
        cfg = dataclasses.replace(cfg, max_new_tokens=0)
    out = generate(params, prompts, rng, cfg, apply_fn=apply_fn, mask_id=tokenizer.mask_id,
                   pad_id=tokenizer.pad_id, eos_id=tokenizer.eos_id, valid=valid, trace=trace)
    completions = completion_texts(tokenizer, out.tokens, start, stop_ids(tokenizer), end)
    return TextGeneration(completions, prompts, valid, out)
