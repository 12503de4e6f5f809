"""Coupled-GRPO (DiffuCoder): GRPO for a masked diffusion model.

A diffusion model has no closed-form token log-probabilities; they are estimated
from forward passes with the completion (partly) masked. The estimators (selected
by `GrpoConfig.estimator`) give a value per completion token:

  coupled    lambda complementary pairs: per pair one t ~ U(t_min, t_max) shared by
             the batch and a random matrix r over the completion; pass A masks the
             tokens with r < t (log-prob weighted 1/t), pass B those with r >= t
             (weighted 1/(1-t)), so each token is scored exactly once per pair in a
             partly masked context. Value = mean over pairs of that per-token term.
  decoupled  as many passes (2 lambda), each with its own t and independent mask
             (weighted 1/t); a token may be scored 0, 1 or several times.
  full_mask  one pass with the whole completion masked (weight 1).
  d1         full_mask plus each prompt token masked with probability
             `prompt_mask_prob` (d1 / diffu-GRPO).
With `full_pass` (the released code's behaviour), coupled and decoupled also run
the fully masked pass and average it in: value = (full + pairs) / 2. The prompt is
never masked except by d1; log-softmax is taken in float32, and the model sees the
padding mask (`valid`).

A rollout batch (what the loss reads); B rows, P prompt and N completion positions:
  tokens      int32 [B, P + N]  the left-padded prompt, then the sampled completion
  valid       bool [B, P + N]   False on the prompt's left padding
  loss_mask   bool [B, N]       completion tokens up to and including the first
                                end-of-turn token (<|im_end|>)
  advantages  float32 [B]
  old_logp    float32 [B, N]    estimator values under the rollout policy (iterations > 1)
  ref_logp    float32 [B, N]    ... under the reference policy (beta > 0)
  mask_seed   int32 [B]         the inner iteration's mask seed (the same in every row)
  row         int32 [B]         the row's index in the rollout batch
A row's masks depend only on (mask_seed, row), so the old, reference and current
policy see the same masks however the batch is split into micro-batches or shards.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from dllm import evaluate as evaluate_lib, rewards, sampling, sharding, tasks as tasks_lib
from dllm.stage import BatchSource, Stage, StageContext

Array = jax.Array

ESTIMATORS = ("coupled", "decoupled", "full_mask", "d1")
ADVANTAGES = ("loo", "mean")


@dataclasses.dataclass(frozen=True)
class GrpoConfig:
    # Log-prob estimator: coupled | decoupled | full_mask | d1 (see the module docstring).
    estimator: str = "coupled"
    pairs: int = 1                  # lambda: complementary pairs (decoupled: 2 * pairs passes)
    # coupled / decoupled: average in the fully masked pass. True: the released code
    # (3 forwards per pair); False: the paper's text (2 forwards per pair).
    full_pass: bool = True
    t_min: float = 0.2              # mask rates t ~ U(t_min, t_max)
    t_max: float = 0.8
    prompt_mask_prob: float = 0.15  # d1 only
    generations: int = 10           # G completions per prompt (one group)
    iterations: int = 2             # mu: updates per rollout batch, each with fresh masks
    advantage: str = "loo"          # loo (leave-one-out, released code) | mean (group mean)
    scale_std: bool = False         # divide advantages by the group's std (+ 1e-4)
    eps_low: float = 0.5            # ratio clipped to [1 - eps_low, 1 + eps_high]
    eps_high: float = 0.5
    beta: float = 0.01              # weight of the k3 KL to the reference policy; 0 = none
    ref_mix_alpha: float = 0.6      # ref <- (1 - alpha) ref + alpha theta ...
    ref_mix_every: int = 64         # ... every this many optimizer steps; 0 = never

    def __post_init__(self):
        for key, allowed in (("estimator", ESTIMATORS), ("advantage", ADVANTAGES)):
            if getattr(self, key) not in allowed:
                raise ValueError(f"grpo.{key}={getattr(self, key)!r}; allowed: {allowed}")
        if not 0.0 < self.t_min <= self.t_max < 1.0:
            raise ValueError(f"grpo.t_min={self.t_min}, grpo.t_max={self.t_max}: "
                             "need 0 < t_min <= t_max < 1")
        if self.pairs < 1 or self.iterations < 1 or self.generations < 2:
            raise ValueError("grpo.pairs and grpo.iterations must be >= 1 and "
                             "grpo.generations >= 2")

    @property
    def passes(self) -> int:
        """Forward passes per estimate (per row)."""
        if self.estimator in ("full_mask", "d1"):
            return 1
        return 2 * self.pairs + int(self.full_pass)


def default_config() -> dict:
    """`config.grpo`: the GrpoConfig fields and the stage's own keys (defaults: the
    released DiffuCoder recipe where it has one)."""
    return dict(
        dataclasses.asdict(GrpoConfig()),
        tasks="",                      # training task suite (dllm.tasks.load_tasks name or jsonl)
        eval_tasks="",                 # held-out suite for eval_pass_at_1 / eval_reward
        eval_style="diffucoder",       # held-out prompts: diffucoder | instruct (EvalPlus's)
        eval_samples=1,                # completions per held-out task
        eval_temperature=0.4,          # held-out decoding temperature (else config.sample)
        max_prompt_len=200,            # prompts are left-truncated (and padded) to this
        execution_weight=2.0,          # reward = 2.0 x execution + 0.5 x format
        format_weight=0.5,
        timeout=5.0,                   # seconds per test case
        workers=0)                     # sandbox processes; 0 = CPU count


def grpo_config_from_dict(d) -> GrpoConfig:
    """GrpoConfig from the GrpoConfig fields of a dict / ConfigDict (other keys of
    `config.grpo`, the rollout settings, are skipped)."""
    fields = {f.name for f in dataclasses.fields(GrpoConfig)}
    return GrpoConfig(**{k: v for k, v in dict(d).items() if k in fields})


# ----------------------------------------------------------------------------- masks

def _row_uniform(key: Array, rows: Array, width: int) -> Array:
    """[B, width] uniforms, row b drawn from fold_in(key, rows[b]): a row's draws do
    not depend on which other rows share its batch."""
    return jax.vmap(lambda r: jax.random.uniform(jax.random.fold_in(key, r), (width,)))(rows)


def estimator_masks(key: Array, rows: Array, prompt_valid: Array, n: int, cfg: GrpoConfig):
    """The masked passes of one estimate.

    key: the iteration's mask key; rows [B] int; prompt_valid [B, P] bool (the prompt's
    real tokens); n: completion length. Returns (masked_prompt [K, B, P] bool,
    masked_completion [K, B, N] bool, weights [K] float32); K = cfg.passes. The
    per-token value is sum_k weights[k] * masked_completion[k] * logp_k.
    """
    b, p = prompt_valid.shape
    full = jnp.ones((b, n), bool)
    no_prompt = jnp.zeros((b, p), bool)
    if cfg.estimator in ("full_mask", "d1"):
        prompt = no_prompt
        if cfg.estimator == "d1":
            prompt = prompt_valid & (_row_uniform(key, rows, p) < cfg.prompt_mask_prob)
        return prompt[None], full[None], jnp.ones((1,), jnp.float32)

    completion, weights = [], []
    for k in range(cfg.pairs if cfg.estimator == "coupled" else 2 * cfg.pairs):
        k_t, k_r = jax.random.split(jax.random.fold_in(key, k))
        t = jax.random.uniform(k_t, (), minval=cfg.t_min, maxval=cfg.t_max)
        r = _row_uniform(k_r, rows, n)
        if cfg.estimator == "coupled":
            completion += [r < t, r >= t]
            weights += [1.0 / t, 1.0 / (1.0 - t)]
        else:
            completion.append(r < t)
            weights.append(1.0 / t)
    weights = jnp.stack(weights) / cfg.pairs
    completion = jnp.stack(completion)
    if cfg.full_pass:
        completion = jnp.concatenate([full[None], completion])
        weights = 0.5 * jnp.concatenate([jnp.ones((1,)), weights])
    prompt = jnp.broadcast_to(no_prompt, (len(weights), b, p))
    return prompt, completion, weights.astype(jnp.float32)


def mask_key(seed: Array) -> Array:
    """The PRNG key of a mask seed (an int32 scalar, possibly traced)."""
    return jax.random.fold_in(jax.random.PRNGKey(0), seed)


# ----------------------------------------------------------------------------- estimates

def token_logps(params, batch, *, apply_fn, cfg: GrpoConfig, mask_id: int) -> Array:
    """The estimator's per-token log-probability values [B, N] float32 of the
    completion (see the module docstring for `batch`; reads tokens, valid, row,
    mask_seed). All passes run as one forward of K * B rows."""
    tokens, valid = batch["tokens"], batch["valid"]
    b, s = tokens.shape
    n = batch["loss_mask"].shape[1]
    p = s - n
    masked_prompt, masked_completion, weights = estimator_masks(
        mask_key(batch["mask_seed"][0]), batch["row"], valid[:, :p], n, cfg)
    k = len(weights)
    masked = jnp.concatenate([masked_prompt, masked_completion], axis=-1)   # [K, B, S]
    noisy = jnp.where(masked, mask_id, tokens[None]).reshape(k * b, s)
    # The head scores the tokens in chunks (float32), never the whole [K*B, S, V] logits.
    nll, _ = apply_fn(params, noisy, jnp.tile(valid, (k, 1)), targets=jnp.tile(tokens, (k, 1)))
    logp = -nll[:, p:].reshape(k, b, n)
    return jnp.einsum("k,kbn->bn", weights, jnp.where(masked_completion, logp, 0.0))


def policy_loss(logp: Array, old_logp: Array, ref_logp: Array | None, advantages: Array,
                loss_mask: Array, cfg: GrpoConfig):
    """The clipped-ratio objective with a k3 KL penalty, as a token mean.

    logp, old_logp, ref_logp: [B, N] estimator values (ref_logp None when beta = 0);
    advantages [B]; loss_mask [B, N] bool. Per token:
      -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A) + beta (exp(d) - d - 1),
    rho = exp(logp - old_logp), d = ref_logp - logp; averaged over loss_mask.
    Returns (loss, metrics dict of scalars)."""
    ratio = jnp.exp(logp - old_logp)
    adv = advantages[:, None]
    clipped = jnp.clip(ratio, 1.0 - cfg.eps_low, 1.0 + cfg.eps_high)
    per_token = -jnp.minimum(ratio * adv, clipped * adv)
    mask = loss_mask.astype(jnp.float32)
    count = jnp.maximum(mask.sum(), 1.0)
    mean = lambda x: (x * mask).sum() / count
    metrics = {}
    if cfg.beta:
        d = ref_logp - logp
        kl = jnp.exp(d) - d - 1.0
        per_token = per_token + cfg.beta * kl
        metrics["kl"] = mean(kl)
    low = (ratio < 1.0 - cfg.eps_low) & (adv < 0)
    high = (ratio > 1.0 + cfg.eps_high) & (adv > 0)
    loss = mean(per_token)
    metrics.update(loss=loss, ratio=mean(ratio), clip_low=mean(low), clip_high=mean(high),
                   clip_fraction=mean(low | high))
    return loss, metrics


def grpo_loss(params, batch, rng, step, *, apply_fn, cfg: GrpoConfig, mask_id: int):
    """The stage's loss_fn(params, batch, rng, step) -> (loss, metrics). Its randomness
    is the batch's mask seed, not `rng`. With one iteration per rollout the old
    policy is the current one (ratio 1, no rollout-time pass needed)."""
    del rng, step
    logp = token_logps(params, batch, apply_fn=apply_fn, cfg=cfg, mask_id=mask_id)
    old = batch["old_logp"] if cfg.iterations > 1 else jax.lax.stop_gradient(logp)
    ref = batch["ref_logp"] if cfg.beta else None
    return policy_loss(logp, old, ref, batch["advantages"], batch["loss_mask"], cfg)


# ----------------------------------------------------------------------------- advantages

def group_advantages(rewards: np.ndarray, group_size: int, kind: str = "loo",
                     scale_std: bool = False) -> np.ndarray:
    """Advantages [B * G] float32 of rewards [B * G] whose groups (a prompt's G
    completions) are consecutive rows.

    loo:  A_i = r_i - (sum_j r_j - r_i) / (G - 1)   (= G / (G - 1) (r_i - mean r))
    mean: A_i = r_i - mean r
    scale_std: divided by the group's standard deviation (ddof 1) + 1e-4.
    A group whose rewards are all equal gets exactly zero."""
    r = np.asarray(rewards, np.float64)
    if r.ndim != 1 or len(r) % group_size or group_size < 2:
        raise ValueError(f"rewards of shape {r.shape} do not split into groups of "
                         f"{group_size} (>= 2) completions")
    g = r.reshape(-1, group_size)
    total = g.sum(1, keepdims=True)
    if kind == "loo":
        adv = g - (total - g) / (group_size - 1)
    elif kind == "mean":
        adv = g - total / group_size
    else:
        raise ValueError(f"advantage kind {kind!r}; allowed: {ADVANTAGES}")
    if scale_std:
        adv = adv / (g.std(1, ddof=1, keepdims=True) + 1e-4)
    adv = np.where((g == g[:, :1]).all(1, keepdims=True), 0.0, adv)
    return adv.reshape(-1).astype(np.float32)


def loss_mask(completion: np.ndarray, end_id: int) -> np.ndarray:
    """[B, N] bool: completion tokens up to and including the first `end_id` (the
    whole completion when it has none)."""
    completion = np.asarray(completion)
    is_end = completion == end_id
    first = np.where(is_end.any(1), is_end.argmax(1), completion.shape[1])
    return np.arange(completion.shape[1])[None] <= first[:, None]


# ----------------------------------------------------------------------------- reference

def mix_reference(ref, params, step: Array, alpha: float, every: int):
    """ref <- (1 - alpha) ref + alpha params when `step` (optimizer steps taken) is a
    multiple of `every` (TRL's ref_model_sync: a soft mix); ref unchanged otherwise
    or when every = 0."""
    if every <= 0:
        return ref
    mix = lambda: jax.tree.map(lambda r, p: ((1 - alpha) * r + alpha * p).astype(r.dtype),
                               ref, params)
    return jax.lax.cond(step % every == 0, mix, lambda: ref)


# ----------------------------------------------------------------------------- the stage

def _gather(x) -> np.ndarray:
    """A global jax.Array -> all of it on every process; numpy rows of each process ->
    their concatenation in process order."""
    if jax.process_count() == 1:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _block(n_rows: int) -> slice:
    """This process's block of the rows of a global batch."""
    per = n_rows // jax.process_count()
    return slice(jax.process_index() * per, (jax.process_index() + 1) * per)


def on_mesh(fn, batch: dict, mesh):
    """fn(global batch) -> pytree of [B, ...] arrays, for a batch whose rows every
    process holds (numpy, with a `row` field = arange(B)): each process passes its
    block; returns the output's rows in batch order, on every process."""
    local = sharding.global_batch({k: v[_block(len(v))] for k, v in batch.items()}, mesh)
    out = fn(local)
    order = np.argsort(_gather(local["row"]))
    return jax.tree.map(lambda x: _gather(x)[order], out)


# The pending rollout's arrays (whole batch, the same on every process) and their dtypes.
ROLLOUT_ARRAYS = {"tokens": np.int32, "valid": np.bool_, "loss_mask": np.bool_,
                  "advantages": np.float32, "old_logp": np.float32, "ref_logp": np.float32,
                  "mask_seeds": np.int32, "row": np.int32}


class Rollouts(BatchSource):
    """The stage's batches: every `iterations` optimizer steps a rollout of
    train.batch_size completions (G per prompt, groups in consecutive rows) from the
    current params, scored in the sandbox, with advantages and the old and reference
    log-probs of every inner iteration; then one batch per inner iteration, each with
    its own mask seed. Each process decodes, scores and trains on its block of rows;
    rewards and completions are gathered, so groups may span processes.

    State (JSON): prompts consumed, rollouts made, the pending rollout and its next
    iteration, so a run resumed between inner iterations goes on with the same rollout."""

    def __init__(self, ctx: StageContext, cfg: GrpoConfig, train_tasks: list):
        c = ctx.config
        self.ctx, self.cfg, self.tasks, self.tok = ctx, cfg, train_tasks, ctx.tokenizer
        self.rows = c.train.batch_size
        self.width, self.seed = c.grpo.max_prompt_len, c.seed
        self.sample_cfg = sampling.sample_config_from_dict(c.sample)
        self.reward_cfg = reward_config(c.grpo)
        self.workers = c.grpo.workers or None
        self.prompt_ids = [self.tok.encode(p) for p in prompts(train_tasks, "diffucoder",
                                                               self.tok)]
        self.logps_fn = jax.jit(functools.partial(token_logps, apply_fn=ctx.apply_fn, cfg=cfg,
                                                  mask_id=self.tok.mask_id))
        self.position = self.count = self.iteration = 0
        self.pending = None
        self.figures, self.times, self._t_last = [], {}, None

    def decode(self, params, prompt_ids: list, rng, cfg: sampling.SampleConfig):
        """Completions of a batch of prompts (token-id lists). Returns the prompts
        (tokens, valid) [B, P], left-truncated and padded to P = grpo.max_prompt_len,
        and the decoded (tokens [B, P + N], model calls [B])."""
        tokens, valid = sampling.left_pad(prompt_ids, self.width, self.tok.pad_id)

        def generate(b):
            out = sampling.generate(params, b["tokens"], rng, cfg, apply_fn=self.ctx.apply_fn,
                                    mask_id=self.tok.mask_id, pad_id=self.tok.pad_id,
                                    eos_id=self.tok.eos_id, valid=b["valid"])
            return out.tokens, out.steps
        batch = {"tokens": tokens, "valid": valid, "row": np.arange(len(tokens), dtype=np.int32)}
        return (tokens, valid), on_mesh(generate, batch, self.ctx.mesh)

    def _time(self, key: str, since: float) -> float:
        now = time.perf_counter()
        self.times[key] = self.times.get(key, 0.0) + now - since
        return now

    def exclude_from_update(self, key: str, since: float) -> None:
        """Counts the time since `since` under `key` (e.g. evaluation between two
        steps) and not as update time."""
        now = self._time(key, since)
        if self._t_last is not None:
            self._t_last += now - since

    def rollout(self, state) -> dict:
        """A new rollout batch (see ROLLOUT_ARRAYS) from state.params."""
        cfg, g = self.cfg, self.cfg.generations
        t = time.perf_counter()
        order = lambda epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self.tasks))
        picks = [int(order(i // len(self.tasks))[i % len(self.tasks)])
                 for i in range(self.position, self.position + self.rows // g)]
        rows = np.repeat(picks, g)
        rng = jax.random.fold_in(jax.random.PRNGKey(self.seed), self.count)
        (_, prompt_valid), (tokens, steps) = self.decode(
            state.params, [self.prompt_ids[i] for i in rows], rng, self.sample_cfg)
        t = self._time("rollout_s", t)
        completion = tokens[:, self.width:]
        texts = sampling.completion_texts(self.tok, completion, 0, sampling.stop_ids(self.tok))
        mine = _block(len(rows))
        scored = self.score(texts[mine], rows[mine])
        parts = {k: _gather(getattr(scored, k)) for k in ("total", "format", "execution")}
        passed = _gather(np.array([r is not None and r.passed for r in scored.results]))
        t = self._time("scoring_s", t)
        batch = completion_batch(tokens, prompt_valid, self.tok.im_end_id)
        batch["advantages"] = group_advantages(parts["total"], g, cfg.advantage, cfg.scale_std)
        batch["mask_seeds"] = np.array([mask_seed(self.seed, self.count, i)
                                        for i in range(cfg.iterations)], np.int32)
        self._old_and_ref_logps(state, batch)
        self._time("logp_s", t)
        self.figures.append(rollout_figures(parts, passed, batch, steps, g))
        self.position += len(picks)
        self.count += 1
        return batch

    def score(self, texts: list[str], task_rows: np.ndarray) -> rewards.Rewards:
        """The rewards of completions `texts` of the tasks self.tasks[task_rows] (this
        process's rows): executed against the tasks' tests in the sandbox."""
        return rewards.compute_rewards(texts, [self.tasks[i].tests for i in task_rows],
                                       self.reward_cfg, self.workers)

    def _old_and_ref_logps(self, state, batch: dict) -> None:
        """Adds old_logp / ref_logp [mu, B, N] (each iteration's masks) when the loss
        needs them: old when iterations > 1, ref when beta > 0."""
        policies = {"old_logp": state.params if self.cfg.iterations > 1 else None,
                    "ref_logp": state.extra["ref"] if self.cfg.beta else None}
        for key, params in policies.items():
            if params is not None:
                batch[key] = np.stack([on_mesh(lambda b: self.logps_fn(params, b),
                                               self.iteration_batch(batch, i), self.ctx.mesh)
                                       for i in range(self.cfg.iterations)])

    def iteration_batch(self, rollout: dict, i: int) -> dict:
        """The whole batch of inner iteration i (all rows; see the module docstring)."""
        b = len(rollout["tokens"])
        batch = {k: rollout[k] for k in ("tokens", "valid", "loss_mask", "advantages", "row")}
        batch["mask_seed"] = np.full((b,), rollout["mask_seeds"][i], np.int32)
        for key in ("old_logp", "ref_logp"):
            if key in rollout:
                batch[key] = rollout[key][i]
        return batch

    def next(self, state) -> dict:
        jax.block_until_ready(state.params)  # the previous step's time counts as update_s
        if self._t_last is not None:
            self._time("update_s", self._t_last)
        if self.pending is None or self.iteration == self.cfg.iterations:
            self.pending, self.iteration = self.rollout(state), 0
        batch = self.iteration_batch(self.pending, self.iteration)
        self.iteration += 1
        self._t_last = time.perf_counter()
        return {k: v[_block(len(v))] for k, v in batch.items()}

    def get_state(self) -> dict:
        pending = None if self.pending is None else {k: v.tolist() for k, v in
                                                     self.pending.items()}
        return {"position": self.position, "rollouts": self.count,
                "iteration": self.iteration, "pending": pending}

    def set_state(self, state: dict) -> None:
        self.position, self.count = state["position"], state["rollouts"]
        self.iteration, pending = state["iteration"], state["pending"]
        self.pending = None if pending is None else {
            k: np.asarray(v, ROLLOUT_ARRAYS[k]) for k, v in pending.items()}

    def metrics(self, step: int) -> dict:
        del step
        out = {k: float(np.mean([f[k] for f in self.figures])) for k in
               (self.figures[0] if self.figures else {})}
        out.update(self.times)
        self.figures, self.times = [], {}
        return out


def mask_seed(seed: int, rollout: int, iteration: int) -> int:
    """The mask seed of an inner iteration: fixed by (run seed, rollout, iteration)."""
    return int(np.random.default_rng([seed, rollout, iteration]).integers(0, 2**31 - 1))


def reward_config(grpo_cfg) -> rewards.RewardConfig:
    return rewards.RewardConfig(execution_weight=grpo_cfg.execution_weight,
                                format_weight=grpo_cfg.format_weight, timeout=grpo_cfg.timeout)


def prompts(tasks: list, style: str, tok) -> list[str]:
    """The model inputs of `tasks` (tasks.build_prompt) in the tokenizer's chat format."""
    chat = lambda messages: tok.apply_chat_template(list(messages), add_generation_prompt=True)
    return [tasks_lib.build_prompt(t, style, chat_template=chat) for t in tasks]


def completion_batch(tokens: np.ndarray, prompt_valid: np.ndarray, end_id: int) -> dict:
    """The rollout-batch fields of prompts + completions: tokens [B, P + N] (P =
    prompt_valid.shape[1]), valid, loss_mask (through the first `end_id`), row."""
    b, p = prompt_valid.shape
    completion = tokens[:, p:]
    return {"tokens": tokens,
            "valid": np.concatenate([prompt_valid, np.ones(completion.shape, bool)], 1),
            "loss_mask": loss_mask(completion, end_id), "row": np.arange(b, dtype=np.int32)}


def sequence_logps(params, batch: dict, seeds, *, apply_fn, cfg: GrpoConfig, mask_id: int):
    """The estimator's sequence log-likelihood (the token values summed over the loss
    mask) under each mask seed: [len(seeds), B]. For its variance over mask draws."""
    def one(seed):
        values = token_logps(params, {**batch, "mask_seed": jnp.full((len(batch["row"]),), seed)},
                             apply_fn=apply_fn, cfg=cfg, mask_id=mask_id)
        return jnp.where(batch["loss_mask"], values, 0.0).sum(-1)
    return jax.lax.map(one, jnp.asarray(seeds, jnp.int32))


def rollout_figures(parts: dict, passed: np.ndarray, batch: dict, steps: np.ndarray,
                    g: int) -> dict:
    """Per-rollout metrics: rewards and their parts, pass rate, advantage statistics,
    completion length (loss tokens), model calls per generated token."""
    groups = parts["total"].reshape(-1, g)
    adv = batch["advantages"]
    return {"reward": parts["total"].mean(), "reward_format": parts["format"].mean(),
            "reward_execution": parts["execution"].mean(), "pass_rate": passed.mean(),
            "reward_std": groups.std(1, ddof=1).mean(),
            "zero_advantage_groups": (groups == groups[:, :1]).all(1).mean(),
            "advantage_abs": np.abs(adv).mean(), "advantage_max": adv.max(),
            "advantage_min": adv.min(), "completion_length": batch["loss_mask"].sum(1).mean(),
            "calls_per_token": steps.mean() / batch["loss_mask"].shape[1]}


def validate_config(c) -> None:
    """Checks config.grpo (config.validate calls this for stage "grpo"): known keys and
    allowed values, the task suites named, whole groups in a batch, and prompts plus
    completions within the context the model is trained at. Raises naming the key."""
    if "grpo" not in c:
        raise KeyError("stage 'grpo' needs a config.grpo section (grpo.default_config())")
    unknown = sorted(set(c.grpo) - set(default_config()))
    if unknown:
        raise KeyError(f"config.grpo has unknown keys {unknown}; allowed: {sorted(default_config())}")
    cfg = grpo_config_from_dict(c.grpo)
    for key, needed in (("tasks", True), ("eval_tasks", bool(c.train.eval_every))):
        if needed and not c.grpo[key]:
            raise ValueError(f"config.grpo.{key} is empty: name a task suite (humaneval, "
                             "synthetic:rl, synthetic:heldout or a jsonl file)")
    if c.train.batch_size % cfg.generations:
        raise ValueError(f"train.batch_size={c.train.batch_size} must be a multiple of "
                         f"grpo.generations={cfg.generations} (whole groups per batch)")
    if c.grpo.max_prompt_len + c.sample.max_new_tokens > c.data.seq_len:
        raise ValueError(f"grpo.max_prompt_len={c.grpo.max_prompt_len} + sample.max_new_tokens="
                         f"{c.sample.max_new_tokens} exceeds data.seq_len={c.data.seq_len}, "
                         "the context the model is trained at")


def make_stage(ctx: StageContext, batches: Rollouts | None = None) -> Stage:
    """coupled-GRPO on `config.grpo.tasks` (or on the given `batches`, e.g. a Rollouts
    subclass with its own scoring); held-out evaluation on `config.grpo.eval_tasks`
    (pass@1 and mean reward); the reference policy in the extra state."""
    c = ctx.config
    cfg = grpo_config_from_dict(c.grpo)
    if batches is None:
        batches = Rollouts(ctx, cfg, tasks_lib.load_tasks(c.grpo.tasks))
    loss_fn = functools.partial(grpo_loss, apply_fn=ctx.apply_fn, cfg=cfg,
                                mask_id=ctx.tokenizer.mask_id)
    evaluate = None
    if c.train.eval_every:
        evaluate = functools.partial(held_out, batches, tasks_lib.load_tasks(c.grpo.eval_tasks))
    ref = {} if not cfg.beta else dict(
        init_extra=lambda params: {"ref": params},
        update_extra=lambda extra, params, step: {"ref": mix_reference(
            extra["ref"], params, step, cfg.ref_mix_alpha, cfg.ref_mix_every)})
    return Stage(loss_fn=loss_fn, batches=batches, evaluate=evaluate, **ref)


def held_out(batches: Rollouts, tasks: list, state) -> dict:
    """eval_pass_at_1 (dllm.evaluate, grpo.eval_samples completions per task) and
    eval_reward (the training reward) on held-out tasks, decoded with config.sample at
    grpo.eval_temperature, with the same random numbers at every evaluation; on
    synthetic tasks also eval_pass_at_1/FAMILY."""
    c = batches.ctx.config
    t = time.perf_counter()
    cfg = dataclasses.replace(batches.sample_cfg, temperature=c.grpo.eval_temperature)
    tok, rows = batches.tok, batches.rows
    calls = itertools.count()

    def sample_fn(texts: list[str]) -> list[str]:
        ids = [tok.encode(x) for x in texts]
        ids += [ids[-1]] * (rows - len(ids))              # a full batch: one compiled shape
        rng = jax.random.fold_in(jax.random.PRNGKey(c.seed + 1), next(calls))
        _, (tokens, _) = batches.decode(state.params, ids, rng, cfg)
        texts_out = sampling.completion_texts(tok, tokens, batches.width,
                                              sampling.stop_ids(tok))
        return texts_out[:len(texts)]

    chat = lambda messages: tok.apply_chat_template(list(messages), add_generation_prompt=True)
    report = evaluate_lib.generate_and_evaluate(
        tasks, sample_fn, n=c.grpo.eval_samples, k=(1,), style=c.grpo.eval_style,
        chat_template=chat, batch_size=rows, timeout=batches.reward_cfg.timeout,
        workers=batches.workers, progress=False)
    by_id = {task.task_id: task for task in tasks}
    scored = rewards.compute_rewards([s["completion"] for s in report["samples"]],
                                     [by_id[s["task_id"]].tests for s in report["samples"]],
                                     batches.reward_cfg, batches.workers)
    batches.exclude_from_update("eval_s", t)
    out = {"eval_pass_at_1": report["pass_at_k"]["1"], "eval_reward": float(scored.total.mean())}
    # Synthetic suites: pass@1 per family too (entry point = family), to see where a
    # run gains or loses.
    by_family: dict[str, list[float]] = {}
    for task_id, result in report["tasks"].items():
        if task_id.startswith(tasks_lib.SYNTHETIC + "/"):
            by_family.setdefault(by_id[task_id].entry_point, []).append(
                result["pass_at_k"]["1"])
    out.update({f"eval_pass_at_1/{name}": float(np.mean(v)) for name, v in by_family.items()})
    return out
