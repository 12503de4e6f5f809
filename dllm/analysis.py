"""The paper's analyses of how a diffusion LM decodes (DiffuCoder, arXiv 2506.20639):
how autoregressive its unmasking order is (local and global AR-ness@k), the entropy
sink (at the first step the model is most confident right after the prompt), and
sweeps over temperature, decoding steps and checkpoints; with a plot beside each.

AR-ness reads a decoding order: `order` [..., L] int holds the step at which each
generated position was unmasked (`sampling.Decoded.order` restricted to the generated
positions; -1 = never unmasked). Positions committed in the same step are taken left
to right, and steps that commit nothing are skipped, so an order is read as the
sequence s_1, s_2, ... of positions in decoding order. The prompt counts as decoded
before everything, left to right: position -1 (its last token) precedes s_1.

  local AR-ness@k   the fraction of decoded positions p = s_i whose k predecessors in
                    decoding order are exactly p - 1, ..., p - k (k = 1: next-token
                    prediction). Predecessors run into the prompt: the first decoded
                    position counts iff it is position 0, the i-th iff s_1..s_i = 0..i-1.
  global AR-ness@k  the fraction of decoded positions that are among the k left-most
                    positions still masked when decoded (never-unmasked positions stay
                    masked).

Both are 1 for left-to-right decoding, and both count every decoded position (the
denominator is the number decoded). Right-to-left decoding of L positions gives local
AR-ness 0 and global AR-ness@k = k / L; a uniformly random order gives global
AR-ness@1 = H_L / L (the i-th decoded is the leftmost of L - i + 1 masked with
chance 1 / (L - i + 1)).

    local = local_ar_ness(order, range(1, 11))    # [..., 10] per sample
    mean, spread = mean_and_spread(local)          # over samples: [10] each
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dllm import evaluate, runs, sampling
from dllm import tasks as tasks_lib
from dllm import tokenizer as tokenizer_lib

# ----------------------------------------------------------------------------- AR-ness


def _as_rows(order) -> np.ndarray:
    order = np.asarray(order)
    if order.ndim < 1 or not np.issubdtype(order.dtype, np.integer):
        raise ValueError(f"order must be an integer array [..., L], got {order.dtype} "
                         f"{order.shape}")
    return order.reshape(-1, order.shape[-1])


def decoding_sequence(order) -> tuple[np.ndarray, np.ndarray]:
    """The positions in decoding order (ties left to right) and how many were decoded.
    order [..., L] -> (sequence [N, L] int: the first n[r] entries of row r are its
    decoded positions in order, then the never-unmasked ones; n [N] int), N = prod(...)."""
    rows = _as_rows(order)
    length = rows.shape[-1]
    key = np.where(rows >= 0, rows.astype(np.int64) * length + np.arange(length),
                   np.iinfo(np.int64).max)
    return np.argsort(key, axis=-1, kind="stable"), (rows >= 0).sum(-1)


def _local_runs(order) -> tuple[np.ndarray, np.ndarray]:
    """For the i-th decoded position s_i of each row: how many of its predecessors in
    decoding order are s_i - 1, s_i - 2, ... without a break (inf when the chain
    reaches the prompt). Returns (runs [N, L] float, decoded [N, L] bool)."""
    seq, n = decoding_sequence(order)
    length = seq.shape[-1]
    prev = np.concatenate([np.full((len(seq), 1), -1), seq[:, :-1]], axis=1)
    follows = seq == prev + 1                       # s_i = s_{i-1} + 1 (s_0 := -1)
    index = np.arange(length)
    last_break = np.maximum.accumulate(np.where(follows, -1, index), axis=-1)
    runs = np.where(last_break < 0, np.inf, index - last_break).astype(np.float64)
    return runs, index < n[:, None]


def _global_ranks(order) -> tuple[np.ndarray, np.ndarray]:
    """For every position p: how many positions left of p were still masked when p was
    decoded. Returns (ranks [N, L] int, decoded [N, L] bool)."""
    rows = _as_rows(order)
    seq, _ = decoding_sequence(rows)
    when = np.argsort(seq, axis=-1)                 # index of each position in the sequence
    left = np.tri(rows.shape[-1], k=-1, dtype=bool)  # [p, q]: q < p
    later = when[:, None, :] > when[:, :, None]     # [r, p, q]: q decoded after p (or never)
    return (later & left).sum(-1), rows >= 0


def _fraction(hit: np.ndarray, decoded: np.ndarray, shape) -> np.ndarray:
    """Per row: the fraction of decoded positions that hit; nan where none decoded."""
    count = decoded.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(count > 0, (hit & decoded).sum(-1) / count, np.nan)
    return frac.reshape(shape)


def _per_k(hits, decoded: np.ndarray, k, order_shape) -> np.ndarray:
    """Fractions for each k: hits(k) -> [N, L] bool. k an int -> [...]; a sequence of
    ints -> [..., len(k)]."""
    ks = np.atleast_1d(np.asarray(k))
    if ks.ndim != 1 or not np.issubdtype(ks.dtype, np.integer) or (ks < 1).any():
        raise ValueError(f"k must be a positive int or a sequence of them, got {k!r}")
    out = np.stack([_fraction(hits(kk), decoded, order_shape[:-1]) for kk in ks], -1)
    return out[..., 0] if np.ndim(k) == 0 else out


def local_ar_ness(order, k) -> np.ndarray:
    """Local AR-ness@k of each decoding (see the module docstring). order: [..., L] int;
    k: an int (-> [...]) or a sequence of ints (-> [..., len(k)]). nan where a row
    decoded nothing."""
    runs, decoded = _local_runs(order)
    return _per_k(lambda kk: runs >= kk, decoded, k, np.shape(order))


def global_ar_ness(order, k) -> np.ndarray:
    """Global AR-ness@k of each decoding (see the module docstring); shapes as
    local_ar_ness."""
    ranks, decoded = _global_ranks(order)
    return _per_k(lambda kk: ranks < kk, decoded, k, np.shape(order))


def random_order_global_ar_ness(length: int, k) -> np.ndarray:
    """Expected global AR-ness@k of a uniformly random order of `length` positions
    decoded one per step: the mean over m = 1..length masked of min(k, m) / m."""
    m = np.arange(1, length + 1)
    ks = np.atleast_1d(np.asarray(k))
    out = np.array([np.mean(np.minimum(kk, m) / m) for kk in ks])
    return out[0] if np.ndim(k) == 0 else out


def mean_and_spread(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation over samples (the leading axes but the last; rows
    that decoded nothing, nan, are left out): [..., K] -> ([K], [K])."""
    flat = np.asarray(values, np.float64).reshape(-1, np.shape(values)[-1])
    with np.errstate(invalid="ignore"):
        return np.nanmean(flat, 0), np.nanstd(flat, 0)


def tokens_per_call(order, steps) -> np.ndarray:
    """Tokens committed per model call of each decoding: decoded positions / model
    calls. order [..., L] int, steps [...] int (`Decoded.steps`) -> [...] float."""
    decoded = (np.asarray(order) >= 0).sum(-1)
    steps = np.asarray(steps)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(steps > 0, decoded / np.maximum(steps, 1), np.nan)


# ----------------------------------------------------------------------------- entropy sink

@functools.partial(jax.jit, static_argnames=("apply_fn", "mask_id", "length"))
def first_step_confidence(params, prompts, valid, *, apply_fn: Callable, mask_id: int,
                          length: int) -> dict:
    """The model's confidence at every position of a fully masked completion: one
    forward pass of each prompt followed by `length` mask tokens, as at the first
    decoding step. prompts, valid: [B, P] (left-padded; valid False on pads).

    Returns {"neg_entropy": [B, length] (Dream's measure, sum_v p log p), "top_logprob":
    [B, length] (LLaDA's: log p of the most probable token)}, float32, from the
    untempered distribution without the mask token (which is never proposed)."""
    b, p = prompts.shape
    tokens = jnp.concatenate([prompts, jnp.full((b, length), mask_id, prompts.dtype)], 1)
    valid = jnp.concatenate([valid, jnp.ones((b, length), bool)], 1)
    logits = apply_fn(params, tokens, valid)[:, p:].astype(jnp.float32)
    logits = jnp.where(jnp.arange(logits.shape[-1]) == mask_id, -jnp.inf, logits)
    logp = jax.nn.log_softmax(logits, -1)
    plogp = jnp.where(jnp.isfinite(logp), jnp.exp(logp) * logp, 0.0)
    return {"neg_entropy": plogp.sum(-1), "top_logprob": logp.max(-1)}


def entropy_sink(run, texts: Sequence[str], length: int, *, batch_size: int = 16) -> dict:
    """first_step_confidence of `run` (runs.Run) after each text, in batches:
    {"neg_entropy", "top_logprob"}: [len(texts), length] each."""
    parts = []
    for start in range(0, len(texts), batch_size):
        prompts, valid = sampling.encode_prompts(run.tokenizer, texts[start:start + batch_size],
                                                 multiple=32)
        parts.append(jax.device_get(first_step_confidence(
            run.params, prompts, valid, apply_fn=run.apply_fn, mask_id=run.tokenizer.mask_id,
            length=length)))
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def confidence_trace(run, texts: Sequence[str], cfg, rng) -> tuple[np.ndarray, np.ndarray]:
    """Decode texts (one batch) with the sampler's trace on: (trace [T, B, N], the
    rule's confidence at each step and generated position, nan once committed;
    order [B, N])."""
    out = sampling.generate_text(run.params, list(texts), rng, cfg, apply_fn=run.apply_fn,
                                 tokenizer=run.tokenizer, trace=True)
    p = out.prompts.shape[1]
    return np.asarray(out.decoded.trace)[:, :, p:], np.asarray(out.decoded.order)[:, p:]


# ----------------------------------------------------------------------------- sweeps
# A point of a sweep decodes every task of a suite n times with one run and one
# SampleConfig, scores the completions with dllm.evaluate (pass@k) and reads the
# decoding orders (AR-ness@k, tokens per model call): one table row.


class Checkpoint(NamedTuple):
    """A run to analyse: a run directory at a step (None = latest), and how task
    prompts are built for it (dllm.tasks.build_prompt's style: base | instruct)."""
    label: str
    workdir: str
    step: int | None = None
    style: str = "instruct"


class Decodes(NamedTuple):
    texts: list[str]       # completions
    order: np.ndarray      # [M, N] int: the step each generated position was unmasked
    steps: np.ndarray      # [M] int: model calls per decoding


def _concat(parts: Sequence[Decodes]) -> Decodes:
    return Decodes([t for d in parts for t in d.texts], np.concatenate([d.order for d in parts]),
                   np.concatenate([d.steps for d in parts]))


def decode(run, texts: Sequence[str], cfg, rng, *, batch_size: int = 16) -> Decodes:
    """Decode each text with `run` (runs.Run) and cfg (sampling.SampleConfig) in
    batches (batch i uses fold_in(rng, i)); the orders at the generated positions."""
    parts = []
    for i, start in enumerate(range(0, len(texts), batch_size)):
        out = sampling.generate_text(run.params, list(texts[start:start + batch_size]),
                                     jax.random.fold_in(rng, i), cfg, apply_fn=run.apply_fn,
                                     tokenizer=run.tokenizer)
        p = out.prompts.shape[1]
        parts.append(Decodes(out.texts, np.asarray(out.decoded.order)[:, p:],
                             np.asarray(out.decoded.steps)))
    return _concat(parts)


def _chat_template(run):
    """messages -> the run tokenizer's chat text with the generation prompt."""
    return lambda messages: run.tokenizer.apply_chat_template(list(messages),
                                                              add_generation_prompt=True)


def task_prompts(run, tasks, style: str = "instruct") -> list[str]:
    """The model input of each task for `style` (dllm.tasks.build_prompt, with the run's
    chat template), as decode_tasks builds them."""
    return [tasks_lib.build_prompt(task, style, chat_template=_chat_template(run))
            for task in tasks]


def decode_tasks(run, tasks, cfg, *, n: int = 1, k: Sequence[int] = (1,),
                 style: str = "instruct", seed: int = 0, batch_size: int = 16,
                 **evaluate_kwargs) -> tuple[Decodes, dict]:
    """n completions per task (prompts built by dllm.tasks for `style`), scored by
    evaluate.generate_and_evaluate; returns the decodes (in the report's sample order)
    and the report. evaluate_kwargs: timeout, workers, progress."""
    parts = []

    def sample_fn(prompts: list[str]) -> list[str]:
        rng = jax.random.fold_in(jax.random.PRNGKey(seed), len(parts))
        parts.append(decode(run, prompts, cfg, rng, batch_size=batch_size))
        return parts[-1].texts

    evaluate_kwargs.setdefault("progress", False)
    report = evaluate.generate_and_evaluate(tasks, sample_fn, n=n, k=k, style=style,
                                            chat_template=_chat_template(run),
                                            batch_size=batch_size,
                                            **evaluate_kwargs)
    return _concat(parts), report


def summarize(decodes: Decodes, ks: Sequence[int], report: dict | None = None) -> dict:
    """One table row: mean and spread over decodings of local / global AR-ness@k for
    each k in ks, tokens per model call, and the report's pass@k."""
    row = {"samples": len(decodes.order)}
    if report is not None:
        row.update({f"pass@{k}": v for k, v in report["pass_at_k"].items()})
    row["tokens_per_call"] = float(np.nanmean(tokens_per_call(decodes.order, decodes.steps)))
    spreads = {}
    for name, fn in (("local", local_ar_ness), ("global", global_ar_ness)):
        mean, spread = mean_and_spread(fn(decodes.order, list(ks)))
        row.update({f"{name}@{k}": float(m) for k, m in zip(ks, mean)})
        spreads.update({f"{name}@{k}_std": float(s) for k, s in zip(ks, spread)})
    return {**row, **spreads}


def temperature_sweep(run, tasks, cfg, temperatures: Sequence[float], *,
                      ks: Sequence[int], **kw) -> list[dict]:
    """AR-ness, tokens per call and pass@k at each temperature (the paper's figure:
    a higher temperature makes the order less autoregressive and raises pass@k).
    kw: decode_tasks' (n, k, style, seed, ...)."""
    rows = []
    for t in temperatures:
        decodes, report = decode_tasks(run, tasks, dataclasses.replace(cfg, temperature=t), **kw)
        rows.append({"temperature": t, **summarize(decodes, ks, report)})
    return rows


def decoding_steps_sweep(points: Sequence[Checkpoint], tasks, cfg, *, ks: Sequence[int],
                         fractions: Sequence[float] = (1.0, 0.5), **kw) -> list[dict]:
    """pass@1 with steps = fraction x max_new_tokens for each point, and its relative
    drop from the first fraction's: 1 - pass@1 / pass@1(first) (the paper: after RL,
    halving the steps costs less). kw: decode_tasks' (n, k, seed, ...)."""
    rows = []
    for point in points:
        run, first = runs.load_run(point.workdir, point.step), None
        for fraction in fractions:
            steps = max(1, round(cfg.max_new_tokens * fraction))
            decodes, report = decode_tasks(run, tasks, dataclasses.replace(cfg, steps=steps),
                                           style=point.style, **kw)
            summary = summarize(decodes, ks, report)
            first = summary["pass@1"] if first is None else first
            drop = 1.0 - summary["pass@1"] / first if first > 0 else float("nan")
            rows.append({"run": point.label, "steps": steps, "pass@1": summary["pass@1"],
                         "relative_drop": drop, **summary})
    return rows


def checkpoint_sweep(points: Sequence[Checkpoint], tasks, cfg, *, ks: Sequence[int],
                     **kw) -> list[dict]:
    """AR-ness, tokens per call and pass@k of each point: training stages, checkpoints
    of one run, RL steps (an RL run is another run directory)."""
    rows = []
    for point in points:
        decodes, report = decode_tasks(runs.load_run(point.workdir, point.step), tasks, cfg,
                                       style=point.style, **kw)
        rows.append({"run": point.label, **summarize(decodes, ks, report)})
    return rows


def write_table(rows: Sequence[dict], stem: str) -> tuple[str, str]:
    """rows as stem.csv and stem.md (a markdown table; floats to 4 digits)."""
    import csv
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(stem + ".csv", "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    cell = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    return stem + ".csv", stem + ".md"


# ----------------------------------------------------------------------------- plots
# Each returns a matplotlib Figure (no pyplot state: shown inline in a notebook,
# written with save()).

def _figure(ncols: int, width: float = 5.0, height: float = 3.6):
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    return fig, np.atleast_1d(fig.subplots(1, ncols))


def save(fig, path: str) -> str:
    fig.savefig(path, dpi=120)
    return path


def _band(ax, x, values, label, **kw):
    """Mean line and a +- one standard deviation band over samples of values [..., K]."""
    mean, spread = mean_and_spread(values)
    line, = ax.plot(x, mean, marker="o", ms=3, label=label, **kw)
    ax.fill_between(x, mean - spread, mean + spread, color=line.get_color(), alpha=0.15)


def plot_ar_ness(rows: Sequence[dict], ks: Sequence[int], length: int | None = None):
    """Local and global AR-ness@k against k (summarize's rows: mean, and the spread over
    samples as a band), one line per row["run"]; length: draw a uniformly random
    order's global AR-ness (of that many positions) for reference."""
    fig, (ax_local, ax_global) = _figure(2)
    for row in rows:
        for ax, name in ((ax_local, "local"), (ax_global, "global")):
            mean = np.array([row[f"{name}@{k}"] for k in ks])
            spread = np.array([row[f"{name}@{k}_std"] for k in ks])
            line, = ax.plot(ks, mean, marker="o", ms=3, label=row["run"])
            ax.fill_between(ks, mean - spread, mean + spread, color=line.get_color(), alpha=0.15)
    if length:
        ax_global.plot(ks, random_order_global_ar_ness(length, ks), "k:", label="random order")
    for ax, name in ((ax_local, "local"), (ax_global, "global")):
        ax.set(xlabel="k", ylabel=f"{name} AR-ness@k", ylim=(-0.02, 1.02),
               title=f"{name} AR-ness@k", xticks=list(ks))
        ax.legend(fontsize=8)
    return fig


def plot_entropy_sink(conf: dict):
    """Confidence at the first step against the position after the prompt: each prompt's
    negative entropy as a heatmap, then the mean and spread over prompts of both
    measures. conf: first_step_confidence's dict of [n_prompts, L] arrays."""
    fig, (ax_map, ax_ent, ax_top) = _figure(3, width=4.4)
    im = ax_map.imshow(conf["neg_entropy"], aspect="auto", interpolation="nearest",
                       cmap="viridis")
    fig.colorbar(im, ax=ax_map, label="negative entropy")
    ax_map.set(xlabel="position after the prompt", ylabel="prompt",
               title="first-step confidence")
    positions = np.arange(np.shape(conf["neg_entropy"])[-1])
    _band(ax_ent, positions, conf["neg_entropy"], "Dream: sum p log p")
    _band(ax_top, positions, conf["top_logprob"], "LLaDA: log p(top token)", color="C1")
    for ax in (ax_ent, ax_top):
        ax.set(xlabel="position after the prompt", ylabel="confidence")
        ax.legend(fontsize=8)
    ax_ent.set_title("mean over prompts")
    return fig


def plot_confidence_trace(trace: np.ndarray, order: np.ndarray, title: str = ""):
    """One decoding's confidence heatmap: trace [T, L] (Decoded.trace of one row at the
    generated positions; nan once committed) over steps and positions, with each
    position's commit step (order [L]) marked."""
    fig, (ax,) = _figure(1, width=7.0, height=4.5)
    last = int(order.max()) + 1 if (order >= 0).any() else len(trace)
    im = ax.imshow(trace[:last], aspect="auto", interpolation="nearest", cmap="magma",
                   origin="lower")
    fig.colorbar(im, ax=ax, label="confidence")
    decoded = np.flatnonzero(order >= 0)
    ax.plot(decoded, order[decoded], "c.", ms=3, label="committed")
    ax.set(xlabel="generated position", ylabel="step", title=title or "confidence per step")
    ax.legend(fontsize=8, loc="upper left")
    return fig


def denoising_frames(tok, out, row: int = 0, frames: int = 6,
                     hidden: str = "_") -> list[tuple[int, str]]:
    """The completion of one row of a sampling.TextGeneration at `frames` steps spread
    over its decoding, as (step, text) with each still-masked token shown as `hidden`
    (one per character of the token it becomes)."""
    p = out.prompts.shape[1]
    tokens = np.asarray(out.decoded.tokens)[row, p:]
    order = np.asarray(out.decoded.order)[row, p:]
    keep = order >= 0
    pieces = tokenizer_lib.token_texts(tok, tokens[keep].tolist())
    last = int(order.max()) if keep.any() else 0
    shown = []
    for step in np.unique(np.linspace(0, last, frames).round().astype(int)):
        text = "".join(piece if t <= step else "".join("\n" if c == "\n" else hidden
                                                        for c in piece)
                       for piece, t in zip(pieces, order[keep]))
        shown.append((int(step), text))
    return shown


def plot_order(order: np.ndarray):
    """The step at which each generated position was unmasked: a heatmap over samples
    (order [n, L], -1 = never) and step against position (a diagonal = left to right)."""
    fig, (ax_map, ax_scatter) = _figure(2, width=6.0, height=3 + 0.15 * len(order))
    shown = np.ma.masked_less(order, 0)
    im = ax_map.imshow(shown, aspect="auto", interpolation="nearest", cmap="viridis")
    fig.colorbar(im, ax=ax_map, label="step unmasked")
    ax_map.set(xlabel="generated position", ylabel="sample", title="decoding order")
    for row in shown:
        ax_scatter.plot(np.flatnonzero(~np.ma.getmaskarray(row)), row.compressed(), ".", ms=3)
    ax_scatter.set(xlabel="generated position", ylabel="step", title="step vs position")
    return fig


def _row_band(ax, x, rows, key, label, **kw):
    """A sweep's mean (rows[i][key]) with its spread (key_std) as error bars."""
    ax.errorbar(x, [r[key] for r in rows], yerr=[r.get(key + "_std", 0.0) for r in rows],
                marker="o", ms=4, capsize=3, label=label, **kw)


def _pass_keys(rows) -> list[str]:
    return [key for key in rows[0] if key.startswith("pass@")]


def plot_temperature(rows: Sequence[dict], ks: Sequence[int] = (1,)):
    """temperature_sweep's rows: AR-ness@k and pass@k against temperature."""
    fig, (ax_ar, ax_pass) = _figure(2)
    x = [r["temperature"] for r in rows]
    for k in ks:
        _row_band(ax_ar, x, rows, f"local@{k}", f"local AR-ness@{k}")
        _row_band(ax_ar, x, rows, f"global@{k}", f"global AR-ness@{k}", ls="--")
    for key in _pass_keys(rows):
        ax_pass.plot(x, [r[key] for r in rows], marker="o", label=key)
    ax_ar.set(xlabel="temperature", ylabel="AR-ness", title="decoding order vs temperature")
    ax_pass.set(xlabel="temperature", ylabel="pass@k", title="pass@k vs temperature")
    for ax in (ax_ar, ax_pass):
        ax.legend(fontsize=8)
    return fig


def plot_decoding_steps(rows: Sequence[dict]):
    """decoding_steps_sweep's rows: pass@1 per run at each number of steps, with the
    relative drop from the first written over each bar."""
    fig, (ax,) = _figure(1, width=6.0)
    labels = list(dict.fromkeys(r["run"] for r in rows))
    steps = list(dict.fromkeys(r["steps"] for r in rows))
    width = 0.8 / len(steps)
    for j, s in enumerate(steps):
        chosen = [next(r for r in rows if r["run"] == label and r["steps"] == s)
                  for label in labels]
        x = np.arange(len(labels)) + j * width
        ax.bar(x, [r["pass@1"] for r in chosen], width, label=f"{s} steps")
        for xi, r in zip(x, chosen):
            if j and np.isfinite(r["relative_drop"]):
                ax.annotate(f"-{100 * r['relative_drop']:.0f}%", (xi, r["pass@1"]),
                            ha="center", va="bottom", fontsize=8)
    ax.set_xticks(np.arange(len(labels)) + width * (len(steps) - 1) / 2, labels)
    ax.set(ylabel="pass@1", title="pass@1 with fewer decoding steps")
    ax.legend(fontsize=8)
    return fig


def plot_checkpoints(rows: Sequence[dict], ks: Sequence[int] = (1,)):
    """checkpoint_sweep's rows: AR-ness@k, pass@k and tokens per model call per run."""
    fig, (ax_ar, ax_pass) = _figure(2)
    x = np.arange(len(rows))
    for k in ks:
        _row_band(ax_ar, x, rows, f"local@{k}", f"local AR-ness@{k}")
        _row_band(ax_ar, x, rows, f"global@{k}", f"global AR-ness@{k}", ls="--")
    for key in _pass_keys(rows):
        ax_pass.plot(x, [r[key] for r in rows], marker="o", label=key)
    ax_calls = ax_pass.twinx()
    ax_calls.plot(x, [r["tokens_per_call"] for r in rows], "k:", marker="x",
                  label="tokens per call")
    ax_calls.set_ylabel("tokens per model call")
    for ax, title in ((ax_ar, "AR-ness by checkpoint"), (ax_pass, "pass@k by checkpoint")):
        ax.set_xticks(x, [r["run"] for r in rows], rotation=20)
        ax.set_title(title)
        ax.legend(fontsize=8, loc="upper left")
    ax_calls.legend(fontsize=8, loc="upper right")
    return fig


# ----------------------------------------------------------------------------- from a config

def checkpoints(config) -> list[Checkpoint]:
    """The runs an analysis config reads (config.read, config.runs.<label>), in order."""
    missing = [label for label in config.read if label not in config.runs]
    if missing:
        raise KeyError(f"config.read names {missing}, not in config.runs "
                       f"({sorted(config.runs)})")
    return [Checkpoint(label, config.runs[label].workdir,
                       None if config.runs[label].step < 0 else config.runs[label].step,
                       config.runs[label].style) for label in config.read]


def run_analysis(config, workdir: str) -> list[str]:
    """The analysis config.analysis (experiments/analysis.py) of config.runs; writes its
    plots (PNG) and tables (CSV and markdown) to workdir and returns their paths."""
    os.makedirs(workdir, exist_ok=True)
    cfg = sampling.sample_config_from_dict(config.sample)
    tasks = tasks_lib.load_tasks(config.tasks)[:config.limit or None]
    points = checkpoints(config)
    ks = list(range(1, config.max_k + 1))
    kw = dict(ks=ks, n=config.n, k=tuple(config.k), seed=config.seed,
              batch_size=config.batch_size, timeout=config.timeout)
    out = lambda name: os.path.join(workdir, name)
    name = config.analysis
    if name in ("arness", "training_stages"):
        rows = checkpoint_sweep(points, tasks, cfg, **kw)
        fig = (plot_ar_ness(rows, ks, cfg.max_new_tokens) if name == "arness"
               else plot_checkpoints(rows, ks=(1, config.max_k)))
    elif name == "decoding_steps":
        rows = decoding_steps_sweep(points, tasks, cfg, fractions=config.fractions, **kw)
        fig = plot_decoding_steps(rows)
    elif name == "temperature":
        run = runs.load_run(points[0].workdir, points[0].step)
        rows = temperature_sweep(run, tasks, cfg, config.temperatures, style=points[0].style,
                                 **kw)
        fig = plot_temperature(rows, ks=(1,))
    elif name == "entropy_sink":
        return _entropy_sink_files(points[0], tasks, cfg, config, out)
    else:
        raise ValueError(f"config.analysis={name!r}; allowed: arness, entropy_sink, "
                         "temperature, decoding_steps, training_stages")
    return [save(fig, out(name + ".png")), *write_table(rows, out(name))]


def _entropy_sink_files(point: Checkpoint, tasks, cfg, config, out) -> list[str]:
    """entropy_sink.png / .csv / .md (first-step confidence per position, over the task
    prompts) and confidence_trace.png (the first prompt's decoding)."""
    run = runs.load_run(point.workdir, point.step)
    texts = task_prompts(run, tasks, point.style)
    conf = entropy_sink(run, texts, cfg.max_new_tokens, batch_size=config.batch_size)
    rows = [{"position": i, **{f"{key}{stat}": float(f(conf[key][:, i]))
                               for key in conf for stat, f in (("", np.mean), ("_std", np.std))}}
            for i in range(cfg.max_new_tokens)]
    trace, order = confidence_trace(run, texts[:1], cfg, jax.random.PRNGKey(config.seed))
    title = f"{point.label}: {tasks[0].task_id}, {cfg.alg} confidence per step"
    return [save(plot_entropy_sink(conf), out("entropy_sink.png")),
            *write_table(rows, out("entropy_sink")),
            save(plot_confidence_trace(trace[:, 0], order[0], title), out("confidence_trace.png"))]
