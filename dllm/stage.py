"""What a training stage hands the one training skeleton (`dllm.train`).

A stage module (`dllm.elbo` for pretraining / mid-training / SFT, `dllm.grpo` for
coupled-GRPO) defines `make_stage(ctx: StageContext) -> Stage`; `config.stage` names
the module (see `STAGES`). The skeleton owns the state, the jitted step,
gradient accumulation, checkpoints, logging and preemption; the stage owns its loss,
its batches, its evaluation and any extra state.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import ml_collections
from jax.sharding import Mesh

from dllm import model as model_lib
from dllm import tokenizer as tokenizer_lib

# config.stage -> the module whose make_stage(ctx) builds it.
STAGES = {"elbo": "dllm.elbo", "grpo": "dllm.grpo"}


class BatchSource:
    """A stage's train batches. The skeleton calls `next(state)` once per optimizer
    step, before the step; `state` is the current TrainState (a source that makes
    rollouts reads state.params / state.extra from it)."""

    def next(self, state) -> dict:
        """This process's batch: dict of numpy arrays [B_local, ...]."""
        raise NotImplementedError

    def get_state(self) -> dict:
        """JSON-able position, checkpointed with the train state."""
        raise NotImplementedError

    def set_state(self, state: dict) -> None:
        raise NotImplementedError

    def metrics(self, step: int) -> dict:
        """Host-side figures (timings, rewards, ...) gathered since the last call;
        merged into the logged row of `step`."""
        del step
        return {}


@dataclasses.dataclass
class Stage:
    """loss_fn(params, batch, rng, step) -> (loss, metrics dict of scalars): traced
    inside the jitted step; rng = fold_in(state.rng, step) (per microbatch i:
    fold_in of that by i). A stage whose randomness must repeat across steps (GRPO's
    mask seed, shared by the old, reference and current policy) takes it from its
    batch instead.
    evaluate(state) -> {name: float}: run at step 0 and every train.eval_every steps.
    init_extra(params) -> pytree: extra state (e.g. a reference policy), checkpointed
    with the train state; called on the boxed abstract params too, so it may only
    rearrange them (e.g. {"ref": params}), and on the real params at the start.
    update_extra(extra, params, step) -> extra: inside the jitted step, after the update.
    tokens_per_step / flops_per_step: for tokens/s and MFU (0 = not reported)."""
    loss_fn: Callable
    batches: BatchSource
    evaluate: Callable | None = None
    init_extra: Callable | None = None
    update_extra: Callable | None = None
    tokens_per_step: int = 0
    flops_per_step: float = 0.0


@dataclasses.dataclass(frozen=True)
class StageContext:
    """What a stage is built from."""
    config: ml_collections.ConfigDict
    workdir: str
    model: model_lib.Transformer
    tokenizer: tokenizer_lib.Tokenizer
    mesh: Mesh
    rules: Any
    apply_fn: Callable   # model_lib.model_apply(model), one object for the whole run

    @property
    def model_cfg(self) -> model_lib.ModelConfig:
        return self.model.cfg

    @property
    def local_batch_size(self) -> int:
        """config.train.batch_size split over the processes (each reads its share)."""
        n = jax.process_count()
        if self.config.train.batch_size % n:
            raise ValueError(f"config.train.batch_size={self.config.train.batch_size} is not a "
                             f"multiple of the {n} processes")
        return self.config.train.batch_size // n
