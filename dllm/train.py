"""The training skeleton every stage shares: TrainState, a pure jitted step with
optional gradient accumulation, checkpoint / resume / preemption, metrics, evaluation
and a final sample.

A stage (`dllm.stage.Stage`, built by the module `config.stage` names: the ELBO stages
in `dllm.elbo`, coupled-GRPO in `dllm.grpo`) supplies its loss, its batches (which may
read the current state, as rollouts do), its evaluation, any extra state and its
throughput figures; everything else is here, once.

    python -m dllm.main --config=experiments/pretrain.py:tiny --workdir=runs/pretrain
"""
from __future__ import annotations

import importlib
import os
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from tqdm import tqdm

from dllm import checkpoint, convert, data, fs, metrics, model as model_lib, runs, sampling
from dllm import config as config_lib
from dllm import sharding
from dllm import tokenizer as tokenizer_lib
from dllm.stage import STAGES, Stage, StageContext

Array = jax.Array


@struct.dataclass
class TrainState:
    step: Array       # int32 scalar
    params: Any
    opt_state: Any
    rng: Array        # base PRNG key (uint32[2]); step n uses fold_in(rng, n)
    extra: Any = None  # the stage's extra state (Stage.init_extra), e.g. a reference policy


def decayed(params):
    """Weight-decay mask: True on kernels and embeddings, False on biases and norm
    scales (as the HF trainers of the reference recipes). By name, not rank: layer
    params are stacked along a leading "layers" axis (works on boxed params too)."""
    def by_name(path, _):
        names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        return names[-1] not in ("bias", "scale")
    return jax.tree_util.tree_map_with_path(by_name, params)


def float32_state(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """`tx` on float32 copies of the gradients and parameters: its state (Adam's
    moments) and updates are float32 whatever the parameters' dtype, so bfloat16
    parameters (model.param_dtype) keep float32 optimizer state; the update is cast
    to the parameter's dtype when applied (optax.apply_updates). A no-op for float32."""
    f32 = lambda tree: jax.tree.map(lambda x: x.astype(jnp.float32), tree)
    return optax.GradientTransformation(
        lambda params: tx.init(f32(params)),
        lambda grads, state, params=None: tx.update(
            f32(grads), state, None if params is None else f32(params)))


def make_optimizer(train_cfg):
    """AdamW (no decay on biases and norm scales) with linear warmup and cosine decay
    to `min_lr_ratio` x peak, after global-norm gradient clipping; float32 state
    whatever the parameters' dtype (float32_state). Returns (tx, lr_schedule)."""
    lr = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=train_cfg.lr, warmup_steps=train_cfg.warmup_steps,
        decay_steps=max(train_cfg.steps, train_cfg.warmup_steps + 1),
        end_value=train_cfg.lr * train_cfg.min_lr_ratio)
    tx = optax.chain(
        optax.clip_by_global_norm(train_cfg.grad_clip),
        optax.adamw(lr, b1=train_cfg.b1, b2=train_cfg.b2, weight_decay=train_cfg.weight_decay,
                    mask=decayed))
    return float32_state(tx), lr


def _init_fn(model: nn.Module, tx, init_extra=None):
    """rng -> TrainState whose params / optimizer state (and extra state) are boxed
    with logical axes."""
    def init_boxed(rng):
        params = model.init(rng, jnp.zeros((1, 8), jnp.int32))["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=tx.init(params), rng=rng,
                          extra=init_extra(params) if init_extra else None)
    return init_boxed


def abstract_state(model: nn.Module, tx, mesh, rules, init_extra=None):
    """(abstract state, state shardings) from `jax.eval_shape`: the state's leaves as
    ShapeDtypeStructs carrying their shardings (derived from the logical annotations);
    no array is allocated, so a 7B state costs nothing to plan or restore into."""
    with sharding.activate(mesh, rules):
        boxed = jax.eval_shape(_init_fn(model, tx, init_extra), jax.random.PRNGKey(0))
        shardings = sharding.logical_shardings(boxed, mesh, rules)
    return sharding.abstract_arrays(nn.unbox(boxed), shardings), shardings


def init_state(model: nn.Module, tx, seed: int, mesh, rules, init_extra=None):
    """Initialise the train state directly into its shardings (each device computes
    only its shards: no host copy). Returns (state, state_shardings)."""
    _, shardings = abstract_state(model, tx, mesh, rules, init_extra)
    init_boxed = _init_fn(model, tx, init_extra)
    with sharding.activate(mesh, rules):
        state = jax.jit(lambda r: nn.unbox(init_boxed(r)), out_shardings=shardings)(
            jax.random.PRNGKey(seed))
    return state, shardings


def _microbatches(batch: dict, n: int) -> dict:
    """[B, ...] -> [n, B / n, ...]; microbatch i holds rows i, i + n, ... so each
    device's contiguous share of the batch splits evenly across microbatches."""
    def split(x):
        if x.shape[0] % n:
            raise ValueError(f"a batch of {x.shape[0]} rows does not split into "
                             f"config.train.microbatches={n}")
        return x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)
    return jax.tree.map(split, batch)


def make_train_step(loss_fn, tx, microbatches: int = 1, update_extra=None):
    """(state, batch) -> (state, metrics): one optimizer step on `loss_fn`, its
    gradient averaged over `microbatches` equal slices of the batch (gradient
    accumulation: one slice's activations in memory at a time); then
    update_extra(extra, params, step) if given."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state: TrainState, batch):
        rng = jax.random.fold_in(state.rng, state.step)
        if microbatches == 1:
            (_, step_metrics), grads = grad_fn(state.params, batch, rng, state.step)
        else:
            def accumulate(total, xs):
                i, micro = xs
                (_, m), g = grad_fn(state.params, micro, jax.random.fold_in(rng, i), state.step)
                return jax.tree.map(jnp.add, total, g), m
            zeros = jax.tree.map(jnp.zeros_like, state.params)
            grads, per_micro = jax.lax.scan(
                accumulate, zeros, (jnp.arange(microbatches), _microbatches(batch, microbatches)))
            grads = jax.tree.map(lambda g: g / microbatches, grads)
            step_metrics = jax.tree.map(lambda m: jnp.mean(m, 0), per_micro)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        extra = state.extra
        if update_extra is not None:
            extra = update_extra(extra, params, state.step + 1)
        step_metrics = {**step_metrics, "grad_norm": optax.global_norm(grads)}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                             extra=extra), step_metrics
    return train_step


def jit_train_step(train_step, state_shardings, mesh):
    return jax.jit(train_step, in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                   out_shardings=(state_shardings, None), donate_argnums=0)


def run_tokenizer(config, workdir: str):
    """The run's tokenizer, kept in `workdir` (the run directory is self-contained; a
    resumed run must use the one it was trained with): data.tokenizer if set, or a
    prepared corpus's own; else that of the run init.checkpoint names (same ids across
    stages); else init.hf_dir's (special tokens it lacks appended); else one trained on
    the corpus on first use (data.get_tokenizer)."""
    init = config.init
    if init.hf_dir and not config.data.tokenizer:
        tok, source = tokenizer_lib.HFTokenizer(init.hf_dir), f"init.hf_dir={init.hf_dir!r}"
    elif init.checkpoint and not config.data.tokenizer:
        tok, source = runs.load_tokenizer(init.checkpoint), f"init.checkpoint={init.checkpoint!r}"
    else:
        tok = data.get_tokenizer(config.data, workdir)
        source = (f"data.tokenizer={config.data.tokenizer!r}" if config.data.tokenizer else
                  f"that of data.source={config.data.source!r}")
    runs.save_tokenizer(tok, workdir, source)
    return tok


class NonFiniteLossError(FloatingPointError):
    exit_code = 1   # dllm.cli: a run that failed, not bad input


class DataExhaustedError(RuntimeError):
    exit_code = 1


def make_stage(config, workdir: str, model: nn.Module, tok, mesh, rules) -> Stage:
    """The stage `config.stage` names, built by its module's make_stage."""
    ctx = StageContext(config=config, workdir=workdir, model=model, tokenizer=tok, mesh=mesh,
                       rules=rules, apply_fn=model_lib.model_apply(model))
    return importlib.import_module(STAGES[config.stage]).make_stage(ctx)


def _start_state(config, model, tx, mesh, rules, stage: Stage, ckpt):
    """(state, shardings): restored from the run's newest readable checkpoint (with the
    batch source's position), else initialised, with params from config.init if set."""
    abstract, state_sh = abstract_state(model, tx, mesh, rules, stage.init_extra)
    if ckpt.latest_step() is not None:  # straight into the shardings: no init, no 2x memory
        state, data_state = ckpt.restore_newest_readable(abstract)
        stage.batches.set_state(data_state)
        return state, state_sh
    state, _ = init_state(model, tx, config.seed, mesh, rules, stage.init_extra)
    if config.init.checkpoint:
        _, params = runs.restore_params(config.init.checkpoint, mesh=mesh, rules=rules,
                                        model_cfg=model.cfg)
        state = state.replace(params=params)
    elif config.init.hf_dir:  # Hugging Face weights, read tensor by tensor into place
        state = state.replace(params=convert.load_hf_params(config.init.hf_dir, model.cfg,
                                                            state_sh.params))
    if stage.init_extra:
        # Built from the final params (a copy: the step donates both).
        extra = jax.jit(stage.init_extra, out_shardings=state_sh.extra)(state.params)
        state = state.replace(extra=extra)
    return state, state_sh


def warm_up(config, workdir: str):
    """Trains config.init.warmup in workdir/warmup (resuming, or returning at once when
    it is done) and returns a copy of config that starts from it (init.checkpoint)."""
    warm_dir = os.path.join(workdir, "warmup")
    train_and_evaluate(config_lib.load_experiment(config.init.warmup), warm_dir)
    config = config.copy_and_resolve_references()
    config.init.checkpoint = warm_dir
    return config


def train_and_evaluate(config, workdir: str) -> TrainState:
    """Train the configured stage in `workdir`, resuming from its latest checkpoint
    (after training config.init.warmup, if set and nothing else initialises the run);
    then print and save a sample. Returns the final state.

    Nothing is written before the config is validated and, in an existing run, checked
    against it (a mismatch leaves the run as it was); config.json is written once the
    state is restored or initialised. The run's lock is held throughout, and a stop
    request (SIGTERM, Ctrl-C) from then on saves at the next step boundary."""
    config_lib.validate(config)
    if config.init.warmup and not (config.init.checkpoint or config.init.hf_dir):
        config = warm_up(config, workdir)
    runs.check_resume(config, workdir)
    with runs.lock(workdir), checkpoint.catch_stop_signals():
        return _train(config, workdir)


def _train(config, workdir: str) -> TrainState:
    tok = run_tokenizer(config, workdir)
    model_cfg = model_lib.config_from_dict(config.model)
    if tok.vocab_size > model_cfg.vocab_size:
        raise ValueError(f"tokenizer has {tok.vocab_size} tokens but config.model.vocab_size="
                         f"{model_cfg.vocab_size}")
    model = model_lib.Transformer(model_cfg)
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.rules_from_config(config.mesh)
    tx, lr = make_optimizer(config.train)
    stage = make_stage(config, workdir, model, tok, mesh, rules)
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"),
                                   config.checkpoint.every, config.checkpoint.keep)
    state, state_sh = _start_state(config, model, tx, mesh, rules, stage, ckpt)
    runs.write_config(config, workdir)

    with sharding.activate(mesh, rules):
        step_fn = jit_train_step(make_train_step(stage.loss_fn, tx, config.train.microbatches,
                                                 stage.update_extra), state_sh, mesh)
        state = _loop(config, workdir, state, step_fn, stage, ckpt, lr, mesh)
    ckpt.close()
    if int(state.step) < config.train.steps:
        print(f"{checkpoint.stop_reason()}: saved step {int(state.step)} in {workdir}/checkpoints;"
              " rerun the same command to resume")
        return state
    print_sample(config, workdir, model, state.params, tok)
    return state


def _log_row(step: int, host: dict, stage: Stage, n_steps: int, dt: float, lr_now: float,
             ceiling: float) -> dict:
    """The logged row: the stage's metrics (means over the interval), its batch
    source's host figures, the learning rate, and throughput when the stage gives it."""
    row = {**host, **stage.batches.metrics(step), "lr": lr_now}
    if stage.tokens_per_step:
        row["tokens_per_s"] = stage.tokens_per_step * n_steps / dt
    if stage.flops_per_step:
        row["mfu"] = stage.flops_per_step * n_steps / dt / ceiling
    return row


def _loop(config, workdir, state, step_fn, stage: Stage, ckpt, lr, mesh):
    """The step loop: log, evaluate, checkpoint; stops on a non-finite loss, and
    after saving on a preemption notice."""
    tc = config.train
    start = int(state.step)
    metrics.drop_rows_after(workdir, start)
    writer = metrics.MetricsWriter(workdir)
    evaluate = stage.evaluate if tc.eval_every else None
    # MFU is against a matmul ceiling measured in this run, on these devices.
    ceiling = (metrics.matmul_ceiling(config.model.dtype) * jax.device_count()
               if stage.flops_per_step else 0.0)
    if evaluate and start == 0:
        writer.write(0, evaluate(state))
    bar = tqdm(total=tc.steps, initial=start, desc="train", dynamic_ncols=True,
               disable=jax.process_index() != 0)
    t_last, pending = time.perf_counter(), []   # device metrics since the last log
    for step in range(start + 1, tc.steps + 1):
        try:
            batch = stage.batches.next(state)
        except StopIteration:  # finite data (a mixture's epochs): keep what was trained
            ckpt.save(step - 1, state, stage.batches.get_state(), force=True)
            ckpt.close()
            raise DataExhaustedError(
                f"the training data ran out before step {step} (config.data epochs); step "
                f"{step - 1} is saved in {workdir}/checkpoints. Lower config.train.steps or "
                "raise the epochs.") from None
        state, step_metrics = step_fn(state, sharding.global_batch(batch, mesh))
        pending.append(step_metrics)
        bar.update(1)
        log_now = step % tc.log_every == 0 or step in (start + 1, tc.steps)
        eval_now = evaluate and (step % tc.eval_every == 0 or step == tc.steps)
        preempted = ckpt.reached_preemption(step)
        save_now = step % config.checkpoint.every == 0 or step == tc.steps or preempted
        if not (log_now or eval_now or save_now):
            continue
        # Logged values are means over the steps since the last log (one transfer).
        host = metrics.to_host(jax.tree.map(lambda *xs: jnp.mean(jnp.stack(xs)), *pending))
        if not metrics.is_finite(host):
            ckpt.close()
            raise NonFiniteLossError(
                f"non-finite metrics at step {step}: {host}; stopping. The last good "
                f"checkpoint (step {ckpt.latest_step()}) in {workdir}/checkpoints is intact.")
        if log_now or eval_now:
            row = _log_row(step, host, stage, len(pending), time.perf_counter() - t_last,
                           float(lr(step - 1)), ceiling)
            if eval_now:
                row.update(evaluate(state))
            writer.write(step, row)
            # Breakdowns such as eval_pass_at_1/FAMILY stay in the logs, off the bar.
            bar.set_postfix({k: f"{v:.3f}" for k, v in row.items()
                             if (k == "loss" or k.startswith("eval_")) and "/" not in k})
            t_last, pending = time.perf_counter(), []
        if save_now:
            ckpt.save(step, state, stage.batches.get_state(),
                      force=step == tc.steps or preempted)
        if preempted:
            break
    bar.close()
    writer.close()
    return state


def print_sample(config, workdir: str, model, params, tok) -> str:
    """Decode a completion of config.sample.prompt; print it and save it."""
    sample_cfg = sampling.sample_config_from_dict(config.sample)
    out = sampling.generate_text(params, [config.sample.prompt], jax.random.PRNGKey(config.seed),
                                 sample_cfg, apply_fn=model_lib.model_apply(model), tokenizer=tok,
                                 max_len=config.data.seq_len, truncate_prompts=True)
    text = out.texts[0]
    if jax.process_index() == 0:
        fs.write_text(os.path.join(workdir, "sample.txt"), config.sample.prompt + text)
        print(f"--- sample ({sample_cfg.max_new_tokens} tokens) ---\n{config.sample.prompt}{text}")
    return text
