"""dllm.convert against transformers: a tiny random Qwen2 built with PyTorch is the
reference (no downloads). Logit parity (causal, bidirectional, left padding), sharded
files, bad weights, import -> export -> import, presets vs released config.json files."""
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from dllm import config as config_lib
from dllm import convert, model as model_lib, runs, sharding, train
from dllm import tokenizer as tokenizer_lib

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB, SEQ = 320, 12
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _tiny_tokenizer(path: str):
    """A byte-level BPE trained on a few lines of code, with Qwen's own specials only."""
    import tokenizers
    from tokenizers import decoders, pre_tokenizers, trainers
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["def add(a, b):\n    return a + b\n", "for i in range(10):\n    print(i)\n"] * 20
    tok.train_from_iterator(text, trainers.BpeTrainer(
        vocab_size=290, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(path)


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """(directory, torch model): a random Qwen2ForCausalLM saved as model.safetensors, with
    random biases and norm scales so that every tensor matters."""
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6, rms_norm_eps=1e-6,
        tie_word_embeddings=False, max_position_embeddings=64)
    net = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(0.0, 0.5)
    path = str(tmp_path_factory.mktemp("hf"))
    net.save_pretrained(path)
    _tiny_tokenizer(os.path.join(path, "tokenizer.json"))
    return path, net


@pytest.fixture(scope="module")
def imported(hf):
    return convert.load_hf(hf[0], dtype="float32")


def _tokens(seed=0, batch=3):
    return np.random.RandomState(seed).randint(0, VOCAB, (batch, SEQ))


def _left_pad_mask(pads):
    valid = np.arange(SEQ)[None] >= np.asarray(pads)[:, None]
    return valid, np.maximum(np.cumsum(valid, 1) - 1, 0)


def _torch_logits(net, tokens, valid, positions, causal):
    if causal:
        mask = torch.tensor(valid.astype(np.int64))
    else:  # full attention among valid tokens; pad rows see themselves (no NaN rows)
        full = (valid[:, None, :, None] & valid[:, None, None, :]) | np.eye(SEQ, dtype=bool)
        mask = {"full_attention": torch.tensor(full)}
    with torch.no_grad():
        return net(torch.tensor(tokens), attention_mask=mask,
                   position_ids=torch.tensor(positions)).logits.numpy()


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("pads", [[0, 0, 0], [0, 3, 7]], ids=["no_pad", "left_pad"])
def test_logits_match_transformers(hf, imported, causal, pads):
    model, params = imported
    assert model.cfg.causal and model.cfg.shift_logits  # a Qwen2ForCausalLM's defaults
    tokens = _tokens()
    valid, positions = _left_pad_mask(pads)
    ref = _torch_logits(hf[1], tokens, valid, positions, causal)
    out = np.asarray(model.apply({"params": params}, jnp.asarray(tokens),
                                 valid=jnp.asarray(valid), lookahead=0 if causal else None))
    for b, pad in enumerate(pads):
        # Shifted (Dream): position i holds the prediction the HF model makes at i - 1.
        np.testing.assert_allclose(out[b, pad + 1:], ref[b, pad:-1], atol=1e-5, rtol=0)
    # The bidirectional model really is different from the causal one.
    other = _torch_logits(hf[1], tokens, valid, positions, not causal)
    assert np.abs(out[0, 1:] - other[0, :-1]).max() > 1e-2


def test_default_attention_follows_the_architecture(hf, tmp_path):
    shutil.copytree(hf[0], tmp_path / "dream", dirs_exist_ok=True)
    with open(tmp_path / "dream" / "config.json") as f:
        cfg = json.load(f)
    with open(tmp_path / "dream" / "config.json", "w") as f:
        json.dump({**cfg, "architectures": ["DreamModel"], "model_type": "Dream"}, f)
    model, _ = convert.load_hf(str(tmp_path / "dream"))
    assert not model.cfg.causal and model.cfg.shift_logits
    model, _ = convert.load_hf(hf[0], causal=False)
    assert not model.cfg.causal


def _assert_trees_equal(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)
    assert jax.tree.structure(a) == jax.tree.structure(b)


def test_sharded_files_on_a_mesh_import_like_one_file(hf, imported, tmp_path):
    hf[1].save_pretrained(tmp_path, max_shard_size="40KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) >= 3
    mesh = sharding.make_mesh(dict(data=1, fsdp=4, tensor=2))
    model, params = convert.load_hf(str(tmp_path), dtype="float32", mesh=mesh)
    _assert_trees_equal(params, imported[1])
    want = runs.param_shardings(model.cfg, mesh)
    jax.tree.map(lambda x, s: x.sharding.is_equivalent_to(s, x.ndim) or pytest.fail(str(s)),
                 params, want)


@pytest.fixture(scope="module")
def state_dict(hf):
    return load_file(os.path.join(hf[0], "model.safetensors"))


def _bad_dir(hf_dir, tensors, path):
    os.makedirs(path)
    shutil.copy(os.path.join(hf_dir, "config.json"), path)
    save_file(tensors, os.path.join(path, "model.safetensors"))
    return str(path)


@pytest.mark.parametrize("change", ["missing", "extra", "shape"])
def test_bad_weights_fail_naming_the_tensor(hf, state_dict, tmp_path, change):
    tensors = dict(state_dict)
    name = "model.layers.1.mlp.up_proj.weight"
    if change == "missing":
        del tensors[name]
    elif change == "extra":
        name = "model.layers.0.self_attn.rotary_emb.inv_freq"
        tensors[name] = np.zeros(8, np.float32)
    else:
        tensors[name] = np.zeros((128, 63), np.float32)
    with pytest.raises(ValueError, match=re.escape(repr(name))):
        convert.load_hf(_bad_dir(hf[0], tensors, tmp_path / change))


def test_index_naming_a_tensor_its_file_lacks_fails(hf, state_dict, tmp_path):
    path = _bad_dir(hf[0], state_dict, tmp_path / "index")
    weight_map = {name: "model.safetensors" for name in state_dict}
    weight_map["model.norm.weight"] = "model-00002-of-00002.safetensors"
    save_file({"model.norm.weight": state_dict["model.norm.weight"]},
              os.path.join(path, "model-00002-of-00002.safetensors"))
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": weight_map}, f)
    with pytest.raises(ValueError, match="model.norm.weight"):
        convert.load_hf(path)


def test_bfloat16_import_rounds_like_torch(hf):
    _, params = convert.load_hf(hf[0], dtype="bfloat16")
    kernel = params["layers"]["mlp"]["down"]["kernel"]
    assert kernel.dtype == jnp.bfloat16
    want = hf[1].model.layers[1].mlp.down_proj.weight.detach().to(torch.bfloat16)
    np.testing.assert_array_equal(np.asarray(kernel[1]).view(np.uint16),
                                  want.T.contiguous().view(torch.int16).numpy().view(np.uint16))


@pytest.fixture(scope="module")
def roundtrip(hf, tmp_path_factory):
    """import_hf -> export_hf (shards of at most 200 kB) -> the exported directory."""
    root = tmp_path_factory.mktemp("roundtrip")
    workdir = convert.import_hf(hf[0], str(root / "run"), dtype="float32")
    files = convert.export_hf(workdir, str(root / "export"), max_shard_bytes=200_000)
    return workdir, str(root / "export"), files


def test_import_writes_a_run_directory(hf, roundtrip, imported):
    workdir = roundtrip[0]
    with open(os.path.join(workdir, "config.json")) as f:
        config = json.load(f)
    assert model_lib.config_from_dict(config["model"]) == imported[0].cfg
    assert config["hf"]["architecture"] == "Qwen2ForCausalLM"
    assert config["hf"]["max_position_embeddings"] == 64 == runs.load_run(workdir).max_len
    # No stage's data or training keys: a run that trains from it brings its own.
    assert sorted(config) == ["hf", "model", "sample"]
    assert os.path.exists(os.path.join(workdir, "hf", "config.json"))
    cfg, params = runs.restore_params(workdir)
    assert cfg == imported[0].cfg
    _assert_trees_equal(params, imported[1])
    tok = tokenizer_lib.load_tokenizer(os.path.join(workdir, "tokenizer.json"))
    assert tok.mask_id < VOCAB and tok.token_to_id("<|im_end|>") == 2


def test_imported_run_loads_with_load_run(roundtrip, imported):
    run = runs.load_run(roundtrip[0])
    assert run.model.cfg == imported[0].cfg and isinstance(run.tokenizer, tokenizer_lib.HFTokenizer)
    _assert_trees_equal(run.params, imported[1])


@pytest.mark.slow  # a real (one-step) training run: ~20-40 s
def test_training_starts_from_hf_weights(hf, imported, tmp_path):
    """--config.init.hf_dir: with lr 0 the trained params are the imported ones."""
    c = config_lib.base_config()
    c.model.update(convert.model_config_from_hf(convert.read_hf_config(hf[0]), dtype="float32"))
    c.data.update(source="stdlib", seq_len=32, max_documents=10, eval_fraction=0.1)
    c.train.update(steps=1, batch_size=8, lr=0.0, warmup_steps=1, log_every=1, eval_every=0)
    c.checkpoint.update(every=1, keep=1)
    c.sample.update(max_new_tokens=4)
    c.init.hf_dir = hf[0]
    state = train.train_and_evaluate(c, str(tmp_path))
    _assert_trees_equal(state.params, imported[1])
    tok = tokenizer_lib.load_tokenizer(str(tmp_path / "tokenizer.json"))
    assert tok.mask_id == tokenizer_lib.HFTokenizer(hf[0]).mask_id


def test_import_export_import_is_bit_exact_and_loads_in_transformers(hf, roundtrip, imported):
    _, out, files = roundtrip
    assert len(files) >= 2 and os.path.exists(os.path.join(out, "model.safetensors.index.json"))
    assert all(os.path.getsize(os.path.join(out, f)) < 200_000 + 4096 for f in files)
    _, params = convert.load_hf(out, dtype="float32")
    _assert_trees_equal(params, imported[1])
    net = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tokens = torch.tensor(_tokens(seed=1))
    with torch.no_grad():
        np.testing.assert_array_equal(net(tokens).logits.numpy(), hf[1](tokens).logits.numpy())
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.convert_tokens_to_ids("<|mask|>") == tokenizer_lib.HFTokenizer(out).mask_id


def test_export_import_round_trips_a_run_trained_from_scratch(trained_run, tmp_path):
    """A sentencepiece run: export writes a tokenizer.json (and a tokenizer_config.json)
    that transformers and `import` load with the run's ids, special tokens and chat
    template; the import brings the params back bit for bit."""
    out = str(tmp_path / "hf")
    convert.export_hf(trained_run, out)
    run = runs.load_run(trained_run)
    assert isinstance(run.tokenizer, tokenizer_lib.SentencePieceTokenizer)
    texts = ["def f(x):\n\treturn  x ** 2   # \u00e9 \u4e2d \U0001f600\n",
             "<|im_start|>user\nhi<|im_end|>\n<|mask|><|dlm_pad|>", open(train.__file__).read()]
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    for text in texts:
        ids = run.tokenizer.encode(text)
        assert hf_tok.encode(text, add_special_tokens=False) == ids
        assert hf_tok.decode(ids) == text
    assert (hf_tok.mask_token_id, hf_tok.pad_token_id) == (run.tokenizer.mask_id,
                                                          run.tokenizer.pad_id)
    messages = [{"role": "user", "content": "Write f."}]
    assert hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        run.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    back = runs.load_run(convert.import_hf(out, str(tmp_path / "back"), dtype="float32"))
    assert back.model.cfg == run.model.cfg
    _assert_trees_equal(back.params, run.params)
    for text in texts:
        assert back.tokenizer.encode(text) == run.tokenizer.encode(text)
        assert back.tokenizer.decode(back.tokenizer.encode(text)) == text


def test_training_in_an_imported_model_directory_is_refused(roundtrip):
    config = config_lib.base_config()
    with pytest.raises(ValueError, match="holds an imported model, not a training run: start "
                                         "a run from it with --config.init.checkpoint="):
        train.train_and_evaluate(config, roundtrip[0])


def test_export_as_dream(hf, roundtrip, tmp_path):
    convert.export_hf(roundtrip[0], str(tmp_path), architecture="DreamModel")
    with open(tmp_path / "config.json") as f:
        config = json.load(f)
    assert config["model_type"] == "Dream" and config["auto_map"]["AutoModel"]
    assert config["mask_token_id"] == tokenizer_lib.HFTokenizer(str(tmp_path)).mask_id
    model, params = convert.load_hf(str(tmp_path), dtype="float32")
    assert not model.cfg.causal
    _, want = convert.load_hf(hf[0], dtype="float32")
    _assert_trees_equal(params, want)


def test_export_of_a_run_started_from_an_import_finds_its_hf_files(roundtrip, tmp_path):
    """A training run initialised with --config.init.checkpoint=IMPORTED has no hf/."""
    run = tmp_path / "run"
    shutil.copytree(os.path.join(roundtrip[0], "checkpoints"), run / "checkpoints")
    shutil.copy(os.path.join(roundtrip[0], "tokenizer.json"), run)
    with open(os.path.join(roundtrip[0], "config.json")) as f:
        config = json.load(f)
    config.pop("hf")
    config["init"] = {"checkpoint": roundtrip[0]}
    with open(run / "config.json", "w") as f:
        json.dump(config, f)
    convert.export_hf(str(run), str(tmp_path / "out"))
    assert os.path.exists(tmp_path / "out" / "generation_config.json")
    with open(tmp_path / "out" / "config.json") as f:
        assert json.load(f)["max_position_embeddings"] == 64  # a key only the source had


def test_cli_import_and_export(hf, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(convert.__file__))}

    def run(*args):
        return subprocess.run([sys.executable, "-m", "dllm.convert", *args], env=env,
                              capture_output=True, text=True, timeout=120)

    done = run("import", f"--hf_dir={hf[0]}", f"--out={tmp_path / 'run'}",
               "--attention=bidirectional")
    assert done.returncode == 0, done.stderr[-2000:]
    done = run("export", f"--ckpt={tmp_path / 'run'}", f"--out={tmp_path / 'hf'}")
    assert done.returncode == 0, done.stderr[-2000:]
    with open(tmp_path / "hf" / "config.json") as f:
        assert json.load(f)["architectures"] == ["Qwen2ForCausalLM"]  # kept from the source
    assert run("convert").returncode != 0


# Released config.json files (huggingface.co), the keys that matter.
DIFFUCODER_7B_INSTRUCT = dict(
    architectures=["DreamModel"], model_type="Dream", hidden_act="silu", hidden_size=3584,
    intermediate_size=18944, mask_token_id=151666, num_attention_heads=28,
    num_hidden_layers=28, num_key_value_heads=4, pad_token_id=151643, rms_norm_eps=1e-06,
    rope_scaling=None, rope_theta=1000000.0, sliding_window=None, tie_word_embeddings=False,
    torch_dtype="bfloat16", use_sliding_window=False, vocab_size=152064)
QWEN25_CODER_05B = dict(
    architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_act="silu", hidden_size=896,
    intermediate_size=4864, num_attention_heads=14, num_hidden_layers=24, num_key_value_heads=2,
    rms_norm_eps=1e-06, rope_theta=1000000.0, tie_word_embeddings=True,
    torch_dtype="bfloat16", use_sliding_window=False, vocab_size=151936)


@pytest.mark.parametrize("hf_config,preset", [(DIFFUCODER_7B_INSTRUCT, "diffucoder-7b"),
                                              (QWEN25_CODER_05B, "qwen2.5-coder-0.5b")])
def test_presets_match_released_configs(hf_config, preset):
    fields = convert.model_config_from_hf(hf_config)
    assert fields["dtype"] == fields["param_dtype"] == "bfloat16"
    assert fields == model_lib.preset(preset, dtype="bfloat16", param_dtype="bfloat16")
    # Round trip through an exported config.json.
    cfg = model_lib.config_from_dict(fields)
    arch = hf_config["architectures"][0]
    assert convert.model_config_from_hf(convert.hf_config_from_model(cfg, arch)) == fields


@pytest.mark.parametrize("key,value", [("rope_scaling", {"type": "yarn", "factor": 4.0}),
                                       ("use_sliding_window", True),
                                       ("hidden_act", "gelu"),
                                       ("architectures", ["LlamaForCausalLM"])])
def test_unsupported_config_fails_naming_the_key(key, value):
    with pytest.raises(ValueError, match=key):
        convert.model_config_from_hf({**QWEN25_CODER_05B, key: value})


def test_missing_weights_file_names_the_directory(hf, tmp_path):
    shutil.copy(os.path.join(hf[0], "config.json"), tmp_path)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path))):
        convert.load_hf(str(tmp_path))
