"""The run directory: config, the one tokenizer rule, params restored into shardings."""
import json
import os
import re
import shutil
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dllm import checkpoint, model as model_lib, runs, sharding
from dllm import tokenizer as tokenizer_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_load_run_restores_the_saved_params(trained_run):
    run = runs.load_run(trained_run)
    assert run.config.train.steps == 2 and run.tokenizer.vocab_size <= run.config.model.vocab_size
    # Independently: the checkpoint's arrays as orbax stored them, on one device.
    ckpt = checkpoint.Checkpointer(os.path.join(trained_run, "checkpoints"), 1, None,
                                   read_only=True)
    meta = ckpt.manager.item_metadata(2)["state"]["params"]
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    saved = ckpt.restore_params(jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta))
    ckpt.close()
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(run.params),
                 jax.device_get(saved))
    logits = run.apply_fn(run.params, jnp.zeros((1, 8), jnp.int32))
    assert logits.shape == (1, 8, run.config.model.vocab_size)
    assert run.apply_fn is run.apply_fn   # one object per run: jitted callers do not recompile


def test_params_are_fsdp_sharded_not_replicated(trained_run):
    assert len(jax.devices()) == 8
    run = runs.load_run(trained_run)
    embedding = run.params["embed"]["embedding"]      # [vocab, embed]: embed over fsdp
    assert run.mesh.shape["fsdp"] == 8
    assert embedding.sharding.spec[1] == "fsdp"
    shard = embedding.addressable_shards[0].data
    assert shard.shape == (embedding.shape[0], embedding.shape[1] // 8)


def test_one_tokenizer_rule(trained_run, tmp_path):
    assert runs.tokenizer_path(trained_run).endswith("tokenizer.model")
    both = tmp_path / "both"
    both.mkdir()
    shutil.copy(runs.tokenizer_path(trained_run), both / "tokenizer.model")
    (both / "tokenizer.json").write_text("{}")
    assert runs.tokenizer_path(str(both)) == str(both / "tokenizer.json")
    with pytest.raises(FileNotFoundError, match="holds no tokenizer"):
        runs.tokenizer_path(str(tmp_path))


def test_missing_run_names_the_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a run directory: no config.json"):
        runs.load_run(str(tmp_path / "nowhere"))


@pytest.mark.parametrize("where", ["local", "gs"])
def test_config_and_tokenizer_files_local_or_gs(where, tmp_path, request):
    from dllm import config as config_lib, fs
    if where == "gs":
        request.getfixturevalue("fake_gcs")
    workdir = str(tmp_path / "run") if where == "local" else "gs://bkt/run"
    config = config_lib.base_config()
    runs.write_config(config, workdir)
    as_json = json.loads(json.dumps(config.to_dict()))     # tuples become lists
    assert runs.read_config(workdir).to_dict() == as_json
    with pytest.raises(FileNotFoundError, match="holds no tokenizer"):
        runs.tokenizer_path(workdir)
    fs.write_text(f"{workdir}/tokenizer.json", "{}")
    assert runs.tokenizer_path(workdir) == f"{workdir}/tokenizer.json"


def test_param_shardings_follow_the_logical_rules():
    cfg = model_lib.ModelConfig(**model_lib.PRESETS["tiny"])
    mesh = sharding.make_mesh(dict(data=1, fsdp=4, tensor=2))
    shardings = runs.param_shardings(cfg, mesh)
    P = jax.sharding.PartitionSpec
    assert shardings["layers"]["mlp"]["up"]["kernel"].spec == P(None, "fsdp", "tensor")
    assert shardings["layers"]["attn"]["q"]["kernel"].spec == P(None, "fsdp", "tensor", None)


def test_readers_do_not_import_the_trainer():
    code = ("import sys, dllm.sample, dllm.evaluate, dllm.runs, dllm.sampling, dllm.analysis, "
            "dllm.analyze; "
            "assert 'dllm.train' not in sys.modules, 'dllm.train imported'")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


_HOLD_LOCK = """
import sys, time
from dllm import runs
with runs.lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(300)
"""


def test_a_second_trainer_is_refused_naming_the_owner(tmp_path):
    """While another process trains in a run directory (holds its lock), a trainer
    there stops at once, naming the owner, and writes nothing; once the owner is gone
    (even by kill -9) the lock is free: the kernel drops it."""
    from dllm import train
    from test_train import tiny_run_config
    workdir = str(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, workdir], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": ROOT})
    try:
        assert holder.stdout.readline() == "locked\n"
        owner = f"host {socket.gethostname()} pid {holder.pid}"
        with pytest.raises(runs.RunLockedError,
                           match=re.escape(f"{workdir} is in use by {owner} (lock ")):
            train.train_and_evaluate(tiny_run_config(steps=2), workdir)
        assert os.listdir(workdir) == [runs.LOCK_FILE]
    finally:
        holder.kill()
        holder.wait()
    with runs.lock(workdir):
        with open(os.path.join(workdir, runs.LOCK_FILE)) as f:
            assert f.read() == f"host {socket.gethostname()} pid {os.getpid()}\n"


def test_the_run_keeps_its_tokenizer(trained_run, tmp_path):
    """save_tokenizer copies a tokenizer in; a different one already there is refused
    naming both (the run was trained with it)."""
    tok = runs.load_tokenizer(trained_run)
    runs.save_tokenizer(tok, str(tmp_path), "data.tokenizer='x'")
    with open(tmp_path / "tokenizer.model", "rb") as f:
        assert f.read() == tok.to_file()[1]
    other = tokenizer_lib.train_sentencepiece(["def f(x):\n    return x + 1\n"] * 20, 300,
                                              str(tmp_path / "other" / "tokenizer.model"))
    with pytest.raises(ValueError, match=r"tokenizer.model is not the tokenizer this config "
                                         r"uses \(data.tokenizer='y'\)"):
        runs.save_tokenizer(other, str(tmp_path), "data.tokenizer='y'")


def test_max_len_is_the_trained_context(trained_run):
    assert runs.load_run(trained_run).max_len == 64 == runs.read_config(trained_run).data.seq_len


def test_resume_ignores_how_the_model_computes_not_what_it_holds(tmp_path):
    """A run saved before the attention / xent_chunk keys existed (and with another
    dtype) resumes; a changed shape key is named."""
    from dllm import config as config_lib
    config = config_lib.base_config()
    saved = config.to_dict()
    for key in ("attention", "xent_chunk"):
        saved["model"].pop(key)
    saved["model"]["dtype"] = "bfloat16"
    (tmp_path / "config.json").write_text(json.dumps(saved))
    (tmp_path / "checkpoints" / "10").mkdir(parents=True)
    runs.check_resume(config, str(tmp_path))
    config.model.hidden = 64
    with pytest.raises(ValueError, match=r"model.hidden: 128 there, 64 here"):
        runs.check_resume(config, str(tmp_path))
