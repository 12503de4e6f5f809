"""The sampling CLI: prompts and infill canvases, and a run end to end."""
import os
import subprocess
import sys

import numpy as np
import pytest

from dllm import runs, sampling
from dllm import tokenizer as tokenizer_lib


@pytest.fixture(scope="module")
def run_dir(trained_run):
    return trained_run


def test_encode_prompts_left_pads_and_places_the_hole(run_dir):
    tok = runs.load_tokenizer(run_dir)
    prompts, valid = sampling.encode_prompts(tok, ["def f(x):", "x"], "    return y", 3)
    a, b = tok.encode("def f(x):"), tok.encode("x")
    hole = [tok.mask_id] * 3 + tok.encode("    return y")
    assert prompts.shape[1] == len(a) + len(hole) == valid[0].sum()
    np.testing.assert_array_equal(prompts[0], a + hole)
    np.testing.assert_array_equal(prompts[1, -len(b + hole):], b + hole)
    pad = len(a) - len(b)
    assert not valid[1, :pad].any() and (prompts[1, :pad] == tok.pad_id).all()
    assert "".join(tokenizer_lib.token_texts(tok, a)) == "def f(x):"


@pytest.mark.slow
def test_cli_samples_shows_and_plots(run_dir, tmp_path):
    plot = str(tmp_path / "order.png")
    args = [sys.executable, "-m", "dllm.sample", f"--workdir={run_dir}", "--prompt=def f(x):",
            "--prompt=import os", "--max_new_tokens=8", "--steps=4", "--block_length=4",
            "--parallel=threshold", "--cache", "--show", "--fps=1000", f"--order_plot={plot}"]
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "step 1/" in result.stdout and "def f(x):" in result.stdout
    assert "parallel='threshold'" in result.stdout and "cache=True" in result.stdout
    assert os.path.getsize(plot) > 0
    bad = subprocess.run(args[:4] + ["--alg=confidence"], capture_output=True, text=True,
                         env=env, timeout=300)
    assert bad.returncode != 0 and "alg" in bad.stderr


def test_a_prompt_longer_than_the_context_is_refused_or_truncated(run_dir):
    """The tiny run was trained at seq_len 64: a prompt that leaves no room for the new
    tokens fails naming it before anything is decoded, or keeps its last tokens."""
    run = runs.load_run(run_dir)
    tok = run.tokenizer
    cfg = sampling.sample_config_from_dict({**dict(run.config.sample), "max_new_tokens": 8})
    long = "x = 1\n" * 4000
    with pytest.raises(ValueError, match=r"prompt 1 is \d+ tokens; with 8 new tokens it exceeds "
                                         r"the model's context of 64 tokens"):
        sampling.generate_text(run.params, ["def f():", long], None, cfg, apply_fn=run.apply_fn,
                               tokenizer=tok, max_len=run.max_len)
    prompts, valid = sampling.encode_prompts(tok, ["def f():", long], n=8, max_len=64,
                                             truncate=True)
    assert valid.sum(1).tolist() == [len(tok.encode("def f():")), 56]
    np.testing.assert_array_equal(prompts[1], tok.encode(long)[-56:])
    with pytest.raises(ValueError, match="leave no room for a prompt"):
        sampling.encode_prompts(tok, ["x"], n=64, max_len=64)
