"""Sample from a trained run.

    python -m dllm.sample --workdir=RUN --prompt='def fib(n):' [--alg=entropy --steps=64 ...]
    python -m dllm.sample --workdir=RUN --prompt='def add(a, b):' --suffix='    return c' \\
        --max_new_tokens=16                       # infill 16 tokens between the two
    python -m dllm.sample --workdir=RUN --prompt='def f(x):' --prompt='import os' \\
        --block_length=32 --parallel=threshold --cache --show --order_plot=order.png

Every `dllm.sampling.SampleConfig` field is a flag; unset ones take the run's
`config.sample`, then SampleConfig's defaults. Several --prompt flags decode as one
left-padded batch; a row stops at <|endoftext|>. --show replays the denoising in the terminal; --order_plot draws
the step at which each position was unmasked. A prompt that does not fit the run's
context (data.seq_len) with the new tokens is an error, or with --truncate_prompts
loses its start.
"""
import dataclasses
import sys
import time

import jax
import numpy as np
from absl import app, flags, logging

from dllm import analysis, cli, runs, sampling
from dllm import tokenizer as tokenizer_lib

_WORKDIR = flags.DEFINE_string("workdir", None, "A trained run (config.json, checkpoints/).")
_PROMPT = flags.DEFINE_multi_string("prompt", ["def fibonacci(n):\n"], "Prompt(s); one row each.")
_SUFFIX = flags.DEFINE_string("suffix", "", "Infill: text after the generated tokens "
                              "(max_new_tokens masks go between prompt and suffix).")
_CHAT = flags.DEFINE_bool("chat", False, "Wrap each prompt in the chat template.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_STEP = flags.DEFINE_integer("checkpoint_step", None, "Checkpoint step (default: latest).")
_SHOW = flags.DEFINE_bool("show", False, "Animate the denoising in the terminal.")
_FPS = flags.DEFINE_float("fps", 20.0, "--show frames per second.")
_ORDER_PLOT = flags.DEFINE_string("order_plot", None, "Write the decoding-order heatmap here.")
_TRUNCATE = flags.DEFINE_bool("truncate_prompts", False, "Cut prompts that do not fit the run's "
                              "context with the new tokens from the left (default: an error).")
flags.mark_flag_as_required("workdir")

_ENUMS = {"alg": sampling.ALGS, "schedule": sampling.SCHEDULES, "parallel": sampling.PARALLEL}
_DEFINE = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer, float: flags.DEFINE_float,
           str: flags.DEFINE_string}
for _field in dataclasses.fields(sampling.SampleConfig):
    _help = f"SampleConfig.{_field.name} (default: the run's, else {_field.default!r})"
    if _field.name in _ENUMS:
        flags.DEFINE_enum(_field.name, None, _ENUMS[_field.name], _help)
    else:
        _DEFINE[type(_field.default)](_field.name, None, _help)


def sample_config(run_sample) -> sampling.SampleConfig:
    """The run's config.sample, overridden by the decoding flags that are set."""
    d = dict(run_sample)
    for f in dataclasses.fields(sampling.SampleConfig):
        if flags.FLAGS[f.name].value is not None:
            d[f.name] = flags.FLAGS[f.name].value
    return sampling.sample_config_from_dict(d)


def show(tok, out: sampling.Decoded, keep: np.ndarray, fps: float):
    """Replay the denoising: masked positions as dots (the width of the token they
    become), each step's new tokens in green."""
    frames = np.asarray(sampling.history(out, tok.mask_id))
    order = np.asarray(out.order)
    texts = [tokenizer_lib.token_texts(tok, row[k].tolist())
             for row, k in zip(np.asarray(out.tokens), keep)]
    for t, frame in enumerate(frames):
        lines = []
        for row, k in enumerate(keep):
            pieces = []
            for text, tok_id, step in zip(texts[row], frame[row][k], order[row][k]):
                hidden = "".join("\n" if c == "\n" else "·" for c in text)
                pieces.append(hidden if tok_id == tok.mask_id else
                              f"\x1b[32m{text}\x1b[0m" if step == t else text)
            lines.append("".join(pieces))
        sys.stdout.write("\x1b[2J\x1b[H" + f"step {t + 1}/{len(frames)}\n\n"
                         + "\n\n----\n\n".join(lines) + "\n")
        sys.stdout.flush()
        time.sleep(1.0 / fps)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    run = runs.load_run(_WORKDIR.value, _STEP.value)
    cfg = sample_config(run.config.sample)
    gen = sampling.generate_text(run.params, _PROMPT.value, jax.random.PRNGKey(_SEED.value), cfg,
                                 apply_fn=run.apply_fn, tokenizer=run.tokenizer, chat=_CHAT.value,
                                 suffix=_SUFFIX.value, multiple=1, max_len=run.max_len,
                                 truncate_prompts=_TRUNCATE.value)
    out, tok = gen.decoded, run.tokenizer
    tokens = np.asarray(out.tokens)
    keep = np.concatenate([gen.prompt_valid, np.ones((len(tokens), tokens.shape[1] -
                                                      gen.prompts.shape[1]), bool)], 1)
    keep &= tokens != tok.pad_id
    if _SHOW.value:
        show(tok, out, keep, _FPS.value)
    for row, k in zip(tokens, keep):
        print(f"{tok.decode(row[k].tolist())}\n----")
    print(f"{cfg}\nsteps per row: {np.asarray(out.steps).tolist()}")
    if _ORDER_PLOT.value:
        order = np.asarray(out.order)
        start = int(np.argmax((order >= 0).any(0)))  # the first generated position
        analysis.save(analysis.plot_order(order[:, start:]), _ORDER_PLOT.value)


if __name__ == "__main__":
    cli.run(main)
