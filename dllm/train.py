"""The training skeleton every stage shares: TrainState, a pure jitted step,
checkpoint/resume, metrics, eval and a final sample.

A stage supplies a loss `loss_fn(params, batch, rng, step) -> (loss, metrics)`
(the ELBO stages: `elbo.elbo_loss`) and its data; `train_step` is the same for all.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct
from tqdm import tqdm

from dllm import checkpoint, convert, data, elbo, metrics, model as model_lib, sampling, sharding
from dllm import tokenizer as tokenizer_lib

Array = jax.Array


@struct.dataclass
class TrainState:
    step: Array       # int32 scalar
    params: Any
    opt_state: Any
    rng: Array        # base PRNG key (uint32[2]); step n uses fold_in(rng, n)


def make_optimizer(train_cfg):
    """AdamW with linear warmup and cosine decay to `min_lr_ratio` x peak, after
    global-norm gradient clipping. Returns (tx, lr_schedule)."""
    lr = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=train_cfg.lr, warmup_steps=train_cfg.warmup_steps,
        decay_steps=max(train_cfg.steps, train_cfg.warmup_steps + 1),
        end_value=train_cfg.lr * train_cfg.min_lr_ratio)
    tx = optax.chain(
        optax.clip_by_global_norm(train_cfg.grad_clip),
        optax.adamw(lr, b1=train_cfg.b1, b2=train_cfg.b2, weight_decay=train_cfg.weight_decay))
    return tx, lr


def _init_fn(model: nn.Module, tx):
    """rng -> TrainState whose params / optimizer state are boxed with logical axes."""
    def init_boxed(rng):
        params = model.init(rng, jnp.zeros((1, 8), jnp.int32))["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=tx.init(params), rng=rng)
    return init_boxed


def abstract_state(model: nn.Module, tx, mesh, rules):
    """(abstract state, state shardings) from `jax.eval_shape`: the state's leaves as
    ShapeDtypeStructs carrying their shardings (derived from the logical annotations);
    no array is allocated, so a 7B state costs nothing to plan or restore into."""
    with sharding.activate(mesh, rules):
        boxed = jax.eval_shape(_init_fn(model, tx), jax.random.PRNGKey(0))
        shardings = sharding.logical_shardings(boxed, mesh, rules)
    return abstract_like(nn.unbox(boxed), shardings), shardings


def init_state(model: nn.Module, tx, seed: int, mesh, rules):
    """Initialise the train state directly into its shardings (each device computes
    only its shards: no host copy). Returns (state, state_shardings)."""
    _, shardings = abstract_state(model, tx, mesh, rules)
    init_boxed = _init_fn(model, tx)
    with sharding.activate(mesh, rules):
        state = jax.jit(lambda r: nn.unbox(init_boxed(r)), out_shardings=shardings)(
            jax.random.PRNGKey(seed))
    return state, shardings


def make_train_step(loss_fn, tx):
    """(state, batch) -> (state, metrics): one optimizer step on `loss_fn`."""
    def train_step(state: TrainState, batch):
        rng = jax.random.fold_in(state.rng, state.step)
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (_, step_metrics), grads = grad_fn(state.params, batch, rng, state.step)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        step_metrics = {**step_metrics, "grad_norm": optax.global_norm(grads)}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), step_metrics
    return train_step


def jit_train_step(train_step, state_shardings, mesh):
    return jax.jit(train_step, in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                   out_shardings=(state_shardings, None), donate_argnums=0)


def model_apply(model: nn.Module):
    """apply_fn(params, tokens, valid=None, lookahead="default", **kw) -> logits; kw
    are Transformer's keywords: cache, window_start, return_kv (cached decoding) and
    targets (-> (nll, argmax) instead of logits: the ELBO losses)."""
    def apply_fn(params, tokens, valid=None, lookahead="default", **kw):
        return model.apply({"params": params}, tokens, valid, lookahead=lookahead, **kw)
    return apply_fn


def stage_loss(config, model: nn.Module, mask_id: int):
    """The ELBO loss of the configured stage as loss_fn(params, batch, rng, step)."""
    loss_cfg = elbo.elbo_config_from_dict(config.loss)
    fn = functools.partial(elbo.elbo_loss, apply_fn=model_apply(model), cfg=loss_cfg,
                           mask_id=mask_id)
    return lambda params, batch, rng, step: fn(params, batch, rng, step=step)


def evaluate_nelbo(eval_fn, params, dataset, mesh, rng, max_batches: int) -> float:
    """Held-out NELBO per token (nats) over at most `max_batches` batches."""
    total, count = 0.0, 0
    for i, batch in enumerate(dataset):
        if i >= max_batches:
            break
        nll, n = eval_fn(params, sharding.global_batch(batch, mesh), jax.random.fold_in(rng, i))
        total += float(jnp.sum(nll))
        count += int(jnp.sum(n))
    return total / max(count, 1)


def run_tokenizer(config, workdir: str):
    """The run's tokenizer: data.tokenizer if set; else the one of the run named by
    init.checkpoint (copied into `workdir`, so ids stay the same across stages); else
    init.hf_dir's (special tokens it lacks appended; saved as workdir/tokenizer.json);
    else data.get_tokenizer (cached in `workdir`, trained on first use)."""
    if config.init.checkpoint and config.init.hf_dir:
        raise ValueError("config.init: set checkpoint or hf_dir, not both")
    if not config.data.tokenizer and config.init.hf_dir:
        tok = tokenizer_lib.HFTokenizer(config.init.hf_dir)
        if jax.process_index() == 0:
            tok.save(os.path.join(workdir, "tokenizer.json"))
        return tok
    if not config.data.tokenizer and config.init.checkpoint:
        source = tokenizer_path(config.init.checkpoint)
        target = os.path.join(workdir, os.path.basename(source))
        if jax.process_index() == 0 and not os.path.exists(target):
            shutil.copy(source, target)
        return tokenizer_lib.load_tokenizer(source)
    return data.get_tokenizer(config.data, workdir)


def tokenizer_path(run_dir: str) -> str:
    """The tokenizer file a run directory holds (tokenizer.model or tokenizer.json)."""
    for name in ("tokenizer.model", "tokenizer.json"):
        path = os.path.join(run_dir, name)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"no tokenizer.model or tokenizer.json in run directory {run_dir!r}")


def abstract_like(tree, shardings):
    """ShapeDtypeStructs carrying `shardings` (restore targets)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


def load_run(workdir: str, step: int | None = None):
    """(config, model, params, tokenizer) of a trained run, params restored onto a mesh
    of all local devices per the run's mesh config (for sampling and evaluation)."""
    with open(os.path.join(workdir, "config.json")) as f:
        config = ml_collections.ConfigDict(json.load(f))
    model = model_lib.Transformer(model_lib.config_from_dict(config.model))
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.rules_from_config(config.mesh)
    with sharding.activate(mesh, rules):
        boxed = jax.eval_shape(lambda r: model.init(r, jnp.zeros((1, 8), jnp.int32))["params"],
                               jax.random.PRNGKey(0))
        shardings = sharding.logical_shardings(boxed, mesh, rules)
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), 1, None)
    params = ckpt.restore_params(abstract_like(nn.unbox(boxed), shardings), step)
    ckpt.close()
    return config, model, params, tokenizer_lib.load_tokenizer(tokenizer_path(workdir))


def write_config(config, workdir: str):
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(config.to_dict(), f, indent=2, default=str)


class NonFiniteLossError(FloatingPointError):
    pass


def train_and_evaluate(config, workdir: str) -> TrainState:
    """Train the configured ELBO stage in `workdir`, resuming from its latest
    checkpoint; then print and save a sample. Returns the final state."""
    write_config(config, workdir)
    tok = run_tokenizer(config, workdir)
    model_cfg = model_lib.config_from_dict(config.model)
    if tok.vocab_size > model_cfg.vocab_size:
        raise ValueError(f"tokenizer has {tok.vocab_size} tokens but config.model.vocab_size="
                         f"{model_cfg.vocab_size}")
    model = model_lib.Transformer(model_cfg)
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.rules_from_config(config.mesh)
    tx, lr = make_optimizer(config.train)
    abstract, state_sh = abstract_state(model, tx, mesh, rules)

    if config.train.batch_size % jax.process_count():
        raise ValueError(f"train.batch_size={config.train.batch_size} is not a multiple of the "
                         f"{jax.process_count()} processes")
    per_process = config.train.batch_size // jax.process_count()
    make_ds = functools.partial(data.make_dataset, config.data, tok, batch_size=per_process,
                                seed=config.seed, process_index=jax.process_index(),
                                process_count=jax.process_count())
    train_iter = iter(make_ds(split="train"))
    # Built now so that an unusable eval split fails before training, not after it.
    eval_ds = make_ds(split="eval") if config.train.eval_every else None
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"),
                                   config.checkpoint.every, config.checkpoint.keep)
    if ckpt.latest_step() is not None:  # straight into the shardings: no init, no 2x memory
        state, data_state = ckpt.restore(abstract)
        train_iter.set_state(data_state)
    else:
        state, _ = init_state(model, tx, config.seed, mesh, rules)
        if config.init.checkpoint:
            init = checkpoint.Checkpointer(os.path.join(config.init.checkpoint, "checkpoints"),
                                           1, None)
            state = state.replace(params=init.restore_params(abstract.params))
            init.close()
        elif config.init.hf_dir:  # Hugging Face weights, read tensor by tensor into place
            state = state.replace(params=convert.load_hf_params(config.init.hf_dir, model_cfg,
                                                                state_sh.params))

    with sharding.activate(mesh, rules), checkpoint.catch_sigterm():
        step_fn = jit_train_step(make_train_step(stage_loss(config, model, tok.mask_id), tx),
                                 state_sh, mesh)
        eval_fn = jax.jit(functools.partial(
            elbo.nelbo, apply_fn=model_apply(model), mask_id=tok.mask_id,
            cfg=elbo.elbo_config_from_dict(config.loss), num_samples=config.train.eval_samples))
        state = _loop(config, workdir, state, step_fn, eval_fn, train_iter, eval_ds, ckpt,
                      lr, model_cfg, mesh)
    ckpt.close()
    if int(state.step) < config.train.steps:
        print(f"preempted: saved step {int(state.step)} in {workdir}/checkpoints; rerun the same "
              "command to resume")
        return state
    print_sample(config, workdir, model, state.params, tok)
    return state


def _loop(config, workdir, state, step_fn, eval_fn, train_iter, eval_ds, ckpt, lr,
          model_cfg, mesh):
    """The step loop: log, eval, checkpoint; stops on a non-finite loss, and after
    saving on a preemption notice."""
    tc = config.train
    tokens_per_step = tc.batch_size * config.data.seq_len
    flops_per_step = model_lib.flops_per_token(model_cfg, config.data.seq_len) * tokens_per_step
    ceiling = metrics.matmul_ceiling(model_cfg.dtype) * jax.device_count()
    writer = metrics.MetricsWriter(workdir)
    start = int(state.step)
    bar = tqdm(total=tc.steps, initial=start, desc="train", dynamic_ncols=True,
               disable=jax.process_index() != 0)
    t_last, pending = time.perf_counter(), []   # device metrics since the last log
    for step in range(start + 1, tc.steps + 1):
        state, step_metrics = step_fn(state, sharding.global_batch(next(train_iter), mesh))
        pending.append(step_metrics)
        bar.update(1)
        log_now = step % tc.log_every == 0 or step in (start + 1, tc.steps)
        preempted = ckpt.reached_preemption(step)
        save_now = step % config.checkpoint.every == 0 or step == tc.steps or preempted
        if not (log_now or save_now):
            continue
        # Logged values are means over the steps since the last log (one transfer).
        host = metrics.to_host(jax.tree.map(lambda *xs: jnp.mean(jnp.stack(xs)), *pending))
        if not metrics.is_finite(host):
            ckpt.close()
            raise NonFiniteLossError(
                f"non-finite metrics at step {step}: {host}; stopping. The last good "
                f"checkpoint (step {ckpt.latest_step()}) in {workdir}/checkpoints is intact.")
        if log_now:
            dt = time.perf_counter() - t_last
            host.update(lr=float(lr(step - 1)), tokens_per_s=tokens_per_step * len(pending) / dt,
                        mfu=flops_per_step * len(pending) / dt / ceiling)
            if tc.eval_every and (step % tc.eval_every == 0 or step == tc.steps):
                host["eval_nelbo"] = evaluate_nelbo(eval_fn, state.params, eval_ds,
                                                    mesh, jax.random.PRNGKey(config.seed + 1),
                                                    tc.eval_batches)
            writer.write(step, host)
            bar.set_postfix(loss=f"{host['loss']:.3f}", acc=f"{host['accuracy']:.3f}")
            t_last, pending = time.perf_counter(), []
        if save_now:
            ckpt.save(step, state, train_iter.get_state(), force=step == tc.steps or preempted)
        if preempted:
            break
    bar.close()
    writer.close()
    return state


def print_sample(config, workdir: str, model, params, tok):
    """Decode a completion of config.sample.prompt; print it and save it."""
    sample_cfg = sampling.sample_config_from_dict(config.sample)
    prompt = np.asarray([tok.encode(config.sample.prompt)], np.int32)
    out = jax.jit(functools.partial(
        sampling.generate, cfg=sample_cfg, apply_fn=model_apply(model), mask_id=tok.mask_id))(
            params, prompt, jax.random.PRNGKey(config.seed)).tokens
    text = tok.decode(np.asarray(out[0, prompt.shape[1]:]).tolist())
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "sample.txt"), "w") as f:
            f.write(config.sample.prompt + text)
        print(f"--- sample ({sample_cfg.max_new_tokens} tokens) ---\n{config.sample.prompt}{text}")
    return text
