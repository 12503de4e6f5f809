"""Hugging Face safetensors <-> dllm params: Qwen2 causal LMs (Qwen2.5-Coder), Dream and
DiffuCoder (same tensors, bidirectional attention, shifted logits).

    model, params = load_hf("DiffuCoder-7B-Instruct")            # bidirectional, shifted
    logits = model.apply({"params": params}, tokens)              # [B, S, V]

    python -m dllm.convert import --hf_dir=HF_DIR --out=WORKDIR    # HF dir -> dllm run workdir
    python -m dllm.convert export --ckpt=WORKDIR --out=HF_DIR      # dllm run -> HF dir

Import reads one tensor at a time (a file is opened per tensor, so the memory map of a
whole 5 GB shard never stays resident), casts it on the host and writes it straight into
its sharded device array; stacked layer arrays are filled in place (donated buffers).
Peak host memory is the output arrays plus a few tensors.

Tensor layout (HF torch Linear weights are [out, in]; flax kernels are [in..., out...],
layers stacked on a leading axis):
    model.embed_tokens.weight [V, E]               embed/embedding [V, E]
    model.layers.i.self_attn.q_proj.weight [N*D, E] layers/attn/q/kernel [L, E, N, D]
    model.layers.i.self_attn.q_proj.bias [N*D]      layers/attn/q/bias [L, N, D]   (k, v alike)
    model.layers.i.self_attn.o_proj.weight [E, N*D] layers/attn/o/kernel [L, N, D, E]
    model.layers.i.mlp.{gate,up}_proj.weight [M, E] layers/mlp/{gate,up}/kernel [L, E, M]
    model.layers.i.mlp.down_proj.weight [E, M]      layers/mlp/down/kernel [L, M, E]
    model.layers.i.{input,post_attention}_layernorm.weight [E]
                                                    layers/{attn,mlp}_norm/scale [L, E]
    model.norm.weight [E]                           final_norm/scale [E]
    lm_head.weight [V, E]                           lm_head/kernel [E, V]  (absent if tied)
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from safetensors import safe_open
from safetensors.numpy import save_file

from dllm import checkpoint as checkpoint_lib
from dllm import cli
from dllm import config as config_lib
from dllm import model as model_lib
from dllm import runs
from dllm import sharding as sharding_lib
from dllm import tokenizer as tokenizer_lib

# ----------------------------------------------------------------------------- configs

# Architecture name (config.json "architectures"[0]) -> attention of that family.
ARCHITECTURES = {"Qwen2ForCausalLM": "causal", "DreamModel": "bidirectional"}
_DREAM_AUTO_MAP = {"AutoConfig": "configuration_dream.DreamConfig",
                   "AutoModel": "modeling_dream.DreamModel"}


def read_hf_config(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{hf_dir}: no config.json (not a Hugging Face model directory)")
    with open(path) as f:
        return json.load(f)


def hf_architecture(hf_config: dict) -> str:
    archs = hf_config.get("architectures") or []
    if len(archs) != 1 or archs[0] not in ARCHITECTURES:
        raise ValueError(f"config.json architectures={archs}; supported: {sorted(ARCHITECTURES)}")
    return archs[0]


def _rope_theta(hf_config: dict) -> float:
    """rope_theta, top-level (released checkpoints) or in rope_parameters (transformers 5)."""
    rope = hf_config.get("rope_parameters") or {}
    for key in ("rope_scaling", "rope_parameters"):
        scaling = hf_config.get(key) or {}
        if scaling.get("rope_type", scaling.get("type", "default")) != "default":
            raise ValueError(f"config.json {key}={scaling}: only default RoPE is supported")
    return float(hf_config.get("rope_theta", rope.get("rope_theta", 10000.0)))


def model_config_from_hf(hf_config: dict, *, dtype: str | None = None,
                         causal: bool | None = None) -> dict:
    """dllm ModelConfig fields (a dict) from a Hugging Face config.json dict.

    dtype: parameter and compute dtype, float32 | bfloat16 (default: bfloat16 for a
    bf16 / fp16 checkpoint, else float32). causal: default attention; None = the
    architecture's (Qwen2ForCausalLM causal, DreamModel bidirectional). Logits are
    always shifted (Dream convention; for a Qwen2 LM position i-1's output predicts i).
    """
    arch = hf_architecture(hf_config)
    for key, want in (("hidden_act", "silu"), ("use_sliding_window", False)):
        if hf_config.get(key, want) != want:
            raise ValueError(f"config.json {key}={hf_config[key]!r}; only {want!r} is supported")
    if any(t != "full_attention" for t in hf_config.get("layer_types") or []):
        raise ValueError(f"config.json layer_types={hf_config['layer_types']}: only "
                         "full_attention is supported")
    if dtype is None:
        stored = hf_config.get("torch_dtype", hf_config.get("dtype", "float32"))
        dtype = "bfloat16" if stored in ("bfloat16", "float16") else "float32"
    heads = hf_config["num_attention_heads"]
    fields = dict(
        vocab_size=hf_config["vocab_size"], hidden=hf_config["hidden_size"],
        layers=hf_config["num_hidden_layers"], heads=heads,
        kv_heads=hf_config.get("num_key_value_heads", heads),
        head_dim=hf_config.get("head_dim") or hf_config["hidden_size"] // heads,
        mlp=hf_config["intermediate_size"], rope_theta=_rope_theta(hf_config),
        rms_eps=hf_config.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(hf_config.get("tie_word_embeddings", False)), qkv_bias=True,
        shift_logits=True,
        causal=ARCHITECTURES[arch] == "causal" if causal is None else causal,
        dtype=dtype, param_dtype=dtype)
    return dataclasses.asdict(model_lib.config_from_dict(fields))


def hf_config_from_model(cfg: model_lib.ModelConfig, architecture: str,
                         base: dict | None = None) -> dict:
    """A config.json dict for `cfg` as `architecture`; other keys of `base` (token ids,
    max_position_embeddings, ...) are kept."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture {architecture!r}; supported: {sorted(ARCHITECTURES)}")
    if not cfg.qkv_bias:
        raise ValueError("model.qkv_bias=False: Qwen2 / Dream checkpoints have q/k/v biases")
    if architecture == "DreamModel" and cfg.head_dim * cfg.heads != cfg.hidden:
        raise ValueError(f"DreamModel needs head_dim*heads == hidden; got {cfg.head_dim}*"
                         f"{cfg.heads} != {cfg.hidden}")
    out = {k: v for k, v in (base or {}).items()
           if k not in ("rope_parameters", "layer_types", "dtype", "auto_map")}
    out.update(
        architectures=[architecture], hidden_act="silu", hidden_size=cfg.hidden,
        intermediate_size=cfg.mlp, num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_eps, rope_theta=cfg.rope_theta,
        rope_scaling=None, tie_word_embeddings=cfg.tie_embeddings, vocab_size=cfg.vocab_size,
        torch_dtype=cfg.param_dtype, use_sliding_window=False, sliding_window=None,
        attention_dropout=0.0)
    if architecture == "DreamModel":
        out.update(model_type="Dream", auto_map=_DREAM_AUTO_MAP)
    else:
        out.update(model_type="qwen2")
    return out


# ----------------------------------------------------------------------------- tensor table

# Per layer: HF name suffix, dllm path under "layers", layout. Layout: int n = a torch
# Linear weight [out, in] whose flax kernel has n input axes (transpose + reshape);
# "flat" = a bias flattened by HF; "same" = identical shape.
_LAYER_TENSORS = (
    ("self_attn.q_proj.weight", ("attn", "q", "kernel"), 1),
    ("self_attn.q_proj.bias", ("attn", "q", "bias"), "flat"),
    ("self_attn.k_proj.weight", ("attn", "k", "kernel"), 1),
    ("self_attn.k_proj.bias", ("attn", "k", "bias"), "flat"),
    ("self_attn.v_proj.weight", ("attn", "v", "kernel"), 1),
    ("self_attn.v_proj.bias", ("attn", "v", "bias"), "flat"),
    ("self_attn.o_proj.weight", ("attn", "o", "kernel"), 2),
    ("mlp.gate_proj.weight", ("mlp", "gate", "kernel"), 1),
    ("mlp.up_proj.weight", ("mlp", "up", "kernel"), 1),
    ("mlp.down_proj.weight", ("mlp", "down", "kernel"), 1),
    ("input_layernorm.weight", ("attn_norm", "scale"), "same"),
    ("post_attention_layernorm.weight", ("mlp_norm", "scale"), "same"),
)


@dataclasses.dataclass(frozen=True)
class Slot:
    """Where one HF tensor lives in the dllm params."""
    path: tuple[str, ...]     # dllm param path, e.g. ("layers", "attn", "q", "kernel")
    layer: int | None         # index on the stacked layer axis; None if not stacked
    shape: tuple[int, ...]    # dllm shape of this tensor (one layer's slice if stacked)
    layout: int | str         # see _LAYER_TENSORS

    @property
    def hf_shape(self) -> tuple[int, ...]:
        if self.layout == "same":
            return self.shape
        if self.layout == "flat":
            return (math.prod(self.shape),)
        n = self.layout
        return (math.prod(self.shape[n:]), math.prod(self.shape[:n]))

    def to_dllm(self, x: np.ndarray) -> np.ndarray:
        """HF tensor (hf_shape) -> dllm layout (shape)."""
        return (x.T if isinstance(self.layout, int) else x).reshape(self.shape)

    def to_hf(self, x: np.ndarray) -> np.ndarray:
        """dllm tensor (shape) -> HF layout (hf_shape), contiguous."""
        if isinstance(self.layout, int):
            out, inp = self.hf_shape
            return np.ascontiguousarray(x.reshape(inp, out).T)
        return np.ascontiguousarray(x.reshape(self.hf_shape))


def tensor_table(cfg: model_lib.ModelConfig) -> dict[str, Slot]:
    """HF tensor name -> Slot, in HF's order (embedding, layer by layer, norm, head)."""
    shapes = {tuple(k.key for k in path): leaf.shape for path, leaf in
              jax.tree_util.tree_flatten_with_path(nn.unbox(model_lib.abstract_params(cfg)))[0]}
    table = {"model.embed_tokens.weight": Slot(("embed", "embedding"), None,
                                               shapes[("embed", "embedding")], "same")}
    for i in range(cfg.layers):
        for suffix, sub, layout in _LAYER_TENSORS:
            path = ("layers", *sub)
            table[f"model.layers.{i}.{suffix}"] = Slot(path, i, shapes[path][1:], layout)
    table["model.norm.weight"] = Slot(("final_norm", "scale"), None,
                                      shapes[("final_norm", "scale")], "same")
    if not cfg.tie_embeddings:
        table["lm_head.weight"] = Slot(("lm_head", "kernel"), None,
                                       shapes[("lm_head", "kernel")], 1)
    return table


def _flat(tree) -> dict[tuple[str, ...], object]:
    return {tuple(k.key for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _unflat(flat: dict[tuple[str, ...], object]) -> dict:
    tree: dict = {}
    for path, leaf in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = leaf
    return tree


# ----------------------------------------------------------------------------- reading

_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"


def scan_safetensors(hf_dir: str) -> dict[str, tuple[str, tuple[int, ...], str]]:
    """Tensor name -> (file, shape, safetensors dtype) from the file headers (no data read).
    Uses the index json's shards if there is one, else model.safetensors."""
    index_path = os.path.join(hf_dir, _INDEX)
    weight_map = None
    if os.path.isfile(index_path):
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
    elif os.path.isfile(os.path.join(hf_dir, _SINGLE)):
        files = [_SINGLE]
    else:
        raise FileNotFoundError(f"{hf_dir}: neither {_SINGLE} nor {_INDEX}")
    found: dict[str, tuple[str, tuple[int, ...], str]] = {}
    for name in files:
        path = os.path.join(hf_dir, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{index_path} lists {name}, which does not exist")
        with safe_open(path, framework="numpy") as f:
            for key in f.keys():
                if key in found:
                    raise ValueError(f"tensor {key!r} is in both {found[key][0]} and {path}")
                info = f.get_slice(key)
                found[key] = (path, tuple(info.get_shape()), info.get_dtype())
    for key, name in (weight_map or {}).items():
        if found.get(key, ("",))[0] != os.path.join(hf_dir, name):
            raise ValueError(f"{index_path} puts tensor {key!r} in {name}, which lacks it")
    return found


def _check_tensors(found: dict, table: dict[str, Slot], hf_dir: str):
    """Every expected tensor present with its shape, nothing else; else one error naming
    each offending tensor."""
    problems = [f"missing tensor {n!r} (shape {table[n].hf_shape})"
                for n in table if n not in found]
    problems += [f"unexpected tensor {n!r} in {found[n][0]}" for n in found if n not in table]
    for n in (n for n in table if n in found):
        path, shape, dtype = found[n]
        if shape != table[n].hf_shape:
            problems.append(f"tensor {n!r} in {path} has shape {shape}; the config "
                            f"expects {table[n].hf_shape}")
        if dtype not in ("F32", "BF16", "F16"):
            problems.append(f"tensor {n!r} in {path} has dtype {dtype}; expected a float")
    if problems:
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ValueError(f"{hf_dir}: the weights do not match config.json:\n  "
                         + "\n  ".join(problems[:20]) + more)


def _read(path: str, name: str, slot: Slot, dtype) -> np.ndarray:
    """One tensor in dllm layout and `dtype`, copied out of its file. The file is opened
    per tensor because the pages of a memory map stay resident until it is closed. Always
    a copy (never a view of the map): on CPU a device array may alias the host buffer."""
    with safe_open(path, framework="numpy") as f:
        return slot.to_dllm(f.get_tensor(name)).astype(dtype, copy=True)


def _put(x: np.ndarray, sharding) -> jax.Array:
    """A host array as a (possibly multi-host) global array; each device gets its slice."""
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def _layer_sharding(sharding):
    """Sharding of one layer's slice of a stacked parameter."""
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(sharding.mesh,
                                          jax.sharding.PartitionSpec(*sharding.spec[1:]))
    return sharding


@functools.partial(jax.jit, donate_argnums=0)
def _set_layer(stacked: jax.Array, value: jax.Array, index: jax.Array) -> jax.Array:
    # Donated: the stacked array is updated in place, not copied per layer.
    return jax.lax.dynamic_update_index_in_dim(stacked, value, index, 0)


def _zeros(shape, dtype, sharding) -> jax.Array:
    return jax.jit(functools.partial(jnp.zeros, shape, dtype), out_shardings=sharding)()


def load_hf_params(hf_dir: str, cfg: model_lib.ModelConfig, shardings=None, dtype=None):
    """The params of `cfg` from the safetensors in `hf_dir`.

    Reads tensor by tensor, casts each to `dtype` (default cfg.param_dtype) on the host and
    places it into `shardings` (a tree like the params, of jax.sharding.Sharding; default:
    all on the first device). Raises ValueError naming every missing, unexpected or
    mis-shaped tensor before reading any data.
    """
    table = tensor_table(cfg)
    found = scan_safetensors(hf_dir)
    _check_tensors(found, table, hf_dir)
    dtype = jnp.dtype(dtype or cfg.param_dtype)
    shapes = _flat(nn.unbox(model_lib.abstract_params(cfg)))
    if shardings is None:
        flat_sh = dict.fromkeys(shapes, jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    else:
        flat_sh = _flat(shardings)
    out = {path: _zeros(shapes[path].shape, dtype, flat_sh[path])
           for path in shapes if path[0] == "layers"}
    for name in sorted(table, key=lambda n: found[n][0]):  # file by file, HF order within
        slot = table[name]
        x = _read(found[name][0], name, slot, dtype)
        if slot.layer is None:
            out[slot.path] = _put(x, flat_sh[slot.path])
        else:
            value = _put(x, _layer_sharding(flat_sh[slot.path]))
            out[slot.path] = _set_layer(out[slot.path], value, jnp.int32(slot.layer))
    return _unflat(out)


def load_hf(hf_dir: str, *, dtype: str | None = None, causal: bool | None = None,
            mesh=None, rules=sharding_lib.DEFAULT_RULES):
    """(Transformer, params) of a Hugging Face Qwen2 / Dream / DiffuCoder directory.

    The model attends causally for a Qwen2ForCausalLM and bidirectionally for a DreamModel
    unless `causal` says otherwise (per call: `lookahead`); logits are shifted. With a
    `mesh` (and logical `rules`), params are sharded on it; else on the first device.
    """
    cfg = model_lib.config_from_dict(
        model_config_from_hf(read_hf_config(hf_dir), dtype=dtype, causal=causal))
    shardings = None if mesh is None else runs.param_shardings(cfg, mesh, rules)
    return model_lib.Transformer(cfg), load_hf_params(hf_dir, cfg, shardings)


# ----------------------------------------------------------------------------- writing

def _hf_tensor(flat_params: dict, slot: Slot, dtype) -> np.ndarray:
    """One tensor on the host in HF layout (gathers only this layer's slice)."""
    x = flat_params[slot.path]
    if slot.layer is not None:
        x = x[slot.layer]
    return slot.to_hf(np.asarray(jax.device_get(x))).astype(dtype, copy=False)


def save_hf_weights(params, cfg: model_lib.ModelConfig, out_dir: str, *,
                    max_shard_bytes: int = 5 * 2**30, dtype=None) -> list[str]:
    """Writes the params as HF safetensors: model.safetensors, or shards of at most
    `max_shard_bytes` (a tensor never split) plus model.safetensors.index.json. One
    shard's tensors are on the host at a time. Single-process. Returns the file names."""
    table = tensor_table(cfg)
    flat = _flat(params)
    dtype = jnp.dtype(dtype or cfg.param_dtype)
    shards, size = [[]], 0
    for name, slot in table.items():
        nbytes = math.prod(slot.hf_shape) * dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards, size = shards + [[]], 0
        shards[-1].append(name)
        size += nbytes
    n = len(shards)
    files = [_SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                                      for i in range(n)]
    os.makedirs(out_dir, exist_ok=True)
    for stale in (_SINGLE, _INDEX, *(f for f in os.listdir(out_dir)
                                    if f.startswith("model-") and f.endswith(".safetensors"))):
        if os.path.exists(os.path.join(out_dir, stale)):
            os.remove(os.path.join(out_dir, stale))
    for fname, names in zip(files, shards):
        tensors = {name: _hf_tensor(flat, table[name], dtype) for name in names}
        save_file(tensors, os.path.join(out_dir, fname), metadata={"format": "pt"})
        del tensors
    if n > 1:
        total = sum(math.prod(s.hf_shape) for s in table.values()) * dtype.itemsize
        index = {"metadata": {"total_size": total},
                 "weight_map": {name: f for f, names in zip(files, shards) for name in names}}
        with open(os.path.join(out_dir, _INDEX), "w") as f:
            json.dump(index, f, indent=2)
    return files


# ----------------------------------------------------------------------------- run workdirs

# Non-weight files of an HF model dir worth keeping: tokenizer files, chat template,
# generation config, Dream's custom code (transformers needs it to load a DreamModel).
_SIDE_SUFFIXES = (".json", ".txt", ".jinja", ".py")
_NOT_SIDE = (_INDEX, "tokenizer.json")


def _copy_side_files(src: str, dst: str, skip=()):
    os.makedirs(dst, exist_ok=True)
    for name in sorted(os.listdir(src)):
        if (name.endswith(_SIDE_SUFFIXES) and name not in _NOT_SIDE and name not in skip
                and os.path.isfile(os.path.join(src, name))):
            shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))


def _run_config(fields: dict, hf_dir: str, hf_config: dict) -> ml_collections.ConfigDict:
    """An imported run's config.json contents: the model, its source (with the context
    it declares, runs.max_len), and the default decoding settings (no stage's data or
    training keys: a run that trains from it brings its own experiment file,
    --config.init.checkpoint=THIS_DIR)."""
    def shape(d):  # the fields a preset fixes (dtypes, remat and kernels are per run)
        return {k: v for k, v in d.items()
                if k not in ("dtype", "param_dtype", "remat", "attention", "xent_chunk")}
    matches = [n for n in model_lib.PRESETS if shape(model_lib.preset(n)) == shape(fields)]
    c = ml_collections.ConfigDict()
    c.model = {**fields, "preset": matches[0] if matches else ""}
    c.hf = dict(source=os.path.abspath(hf_dir), architecture=hf_architecture(hf_config),
                max_position_embeddings=hf_config.get("max_position_embeddings"))
    c.sample = config_lib.base_config().sample
    return c


def import_hf(hf_dir: str, workdir: str, *, dtype: str | None = None,
              causal: bool | None = None) -> str:
    """Writes a dllm run directory from a Hugging Face model directory; returns it.

    workdir/config.json       the stage defaults with this model (`model.*`) and `hf.*`
    workdir/tokenizer.json    the HF tokenizer, missing special tokens appended
    workdir/hf/               the source's config.json and tokenizer / template / code files
    workdir/checkpoints/0/    {"step": 0, "params": ...} (no optimizer state: a run starts
                              from it with --config.init.checkpoint=workdir)
    Params are placed fsdp-sharded over all devices while they are read.
    """
    hf_config = read_hf_config(hf_dir)
    fields = model_config_from_hf(hf_config, dtype=dtype, causal=causal)
    cfg = model_lib.config_from_dict(fields)
    tok = tokenizer_lib.HFTokenizer(hf_dir)
    if tok.vocab_size > cfg.vocab_size:
        raise ValueError(f"{hf_dir}: the tokenizer has {tok.vocab_size} ids (with "
                         f"{tok.added} appended) but vocab_size is {cfg.vocab_size}")
    if hf_config.get("mask_token_id", tok.mask_id) != tok.mask_id:
        raise ValueError(f"{hf_dir}: config.json mask_token_id={hf_config['mask_token_id']} "
                         f"but the tokenizer's {tokenizer_lib.MASK} is {tok.mask_id}")
    mesh = sharding_lib.make_mesh(runs.READ_MESH)
    params = load_hf_params(hf_dir, cfg, runs.param_shardings(cfg, mesh))
    if jax.process_index() == 0:
        _copy_side_files(hf_dir, os.path.join(workdir, "hf"))
        tok.save(os.path.join(workdir, "tokenizer.json"))
        runs.write_config(_run_config(fields, hf_dir, hf_config), workdir)
    ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), 1, None)
    ckpt.save(0, {"step": jnp.int32(0), "params": params}, {}, force=True)
    ckpt.close()
    return workdir


def _hf_base(workdir: str) -> str | None:
    """The HF directory a run descends from: its own hf/ (written by import_hf), else
    config.init.hf_dir, else that of the run its config.init.checkpoint names."""
    while workdir:
        if os.path.isdir(os.path.join(workdir, "hf")):
            return os.path.join(workdir, "hf")
        init = runs.read_config(workdir).get("init", {})
        if init.get("hf_dir"):
            return init["hf_dir"]
        workdir = init.get("checkpoint", "")
    return None


def export_hf(workdir: str, out_dir: str, *, step: int | None = None,
              architecture: str | None = None, dtype: str | None = None,
              hf_base: str | None = None, max_shard_bytes: int = 5 * 2**30) -> list[str]:
    """Writes a run's params (`step`, default latest) as a Hugging Face directory that
    transformers loads: config.json, safetensors (+ index), tokenizer.json (a
    sentencepiece run's converted: SentencePieceTokenizer.to_hf), a tokenizer_config.json
    where the base has none, and the side files of `hf_base` (default: the run's own hf/, else its config.init.hf_dir, else
    those of the run its config.init.checkpoint names). `architecture`
    defaults to the base's, else DreamModel for a bidirectional model and
    Qwen2ForCausalLM for a causal one. Returns the weight file names."""
    cfg, params = runs.restore_params(workdir, step)
    tok = runs.load_tokenizer(workdir)
    hf_base = hf_base or _hf_base(workdir)
    base = read_hf_config(hf_base) if hf_base else None
    architecture = architecture or (hf_architecture(base) if base else
                                    "Qwen2ForCausalLM" if cfg.causal else "DreamModel")
    hf_config = hf_config_from_model(cfg, architecture, base)
    hf_config["torch_dtype"] = dtype or cfg.param_dtype
    if architecture == "DreamModel":
        hf_config["mask_token_id"] = tok.mask_id
    os.makedirs(out_dir, exist_ok=True)
    if hf_base:
        _copy_side_files(hf_base, out_dir, skip=("config.json",))
    tok.to_hf().save(os.path.join(out_dir, "tokenizer.json"))
    if not os.path.exists(os.path.join(out_dir, "tokenizer_config.json")):
        _write_tokenizer_config(out_dir, runs.max_len(runs.read_config(workdir)))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    return save_hf_weights(params, cfg, out_dir, max_shard_bytes=max_shard_bytes, dtype=dtype)


def _write_tokenizer_config(out_dir: str, max_len: int | None):
    """tokenizer_config.json for a tokenizer.json without one (a run trained from scratch):
    transformers' generic fast tokenizer, the special tokens, the ChatML template."""
    t = tokenizer_lib
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": t.BOS, "eos_token": t.EOS,
              "pad_token": t.PAD, "mask_token": t.MASK,
              "additional_special_tokens": [t.IM_START, t.IM_END],
              "clean_up_tokenization_spaces": False, "chat_template": t.CHAT_TEMPLATE_JINJA}
    if max_len:
        config["model_max_length"] = max_len
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)


# ----------------------------------------------------------------------------- CLI

def _define_flags():
    flags.DEFINE_string("hf_dir", None, "import: Hugging Face model directory.")
    flags.DEFINE_string("ckpt", None, "export: dllm run directory (as written by import or "
                        "training).")
    flags.DEFINE_string("out", None, "import: run directory to write; export: HF directory.")
    flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Parameter dtype (default: "
                      "the checkpoint's; bf16 / fp16 checkpoints import as bfloat16).")
    flags.DEFINE_enum("attention", "auto", ["auto", "causal", "bidirectional"],
                      "import: default attention (auto: causal for Qwen2ForCausalLM, "
                      "bidirectional for DreamModel).")
    flags.DEFINE_integer("step", None, "export: checkpoint step (default: latest).")
    flags.DEFINE_enum("arch", None, sorted(ARCHITECTURES), "export: architecture in "
                      "config.json (default: the imported one, else by attention).")
    flags.DEFINE_string("hf_base", None, "export: HF directory whose config keys and side "
                        "files to carry over (default: CKPT/hf, else the HF source of the "
                        "run CKPT was initialised from).")
    flags.DEFINE_float("max_shard_gb", 5.0, "export: maximum safetensors shard size (GiB).")


def _main(argv):
    f = flags.FLAGS
    if len(argv) != 2 or argv[1] not in ("import", "export"):
        raise app.UsageError("usage: python -m dllm.convert import --hf_dir=DIR --out=RUN_DIR"
                             " | export --ckpt=RUN_DIR --out=HF_DIR")
    if argv[1] == "import":
        if not (f.hf_dir and f.out):
            raise app.UsageError("import needs --hf_dir and --out")
        causal = {"auto": None, "causal": True, "bidirectional": False}[f.attention]
        print(f"imported {f.hf_dir} -> {import_hf(f.hf_dir, f.out, dtype=f.dtype, causal=causal)}")
    else:
        if not (f.ckpt and f.out):
            raise app.UsageError("export needs --ckpt and --out")
        files = export_hf(f.ckpt, f.out, step=f.step, architecture=f.arch, dtype=f.dtype,
                          hf_base=f.hf_base, max_shard_bytes=int(f.max_shard_gb * 2**30))
        print(f"exported {f.ckpt} -> {f.out} ({len(files)} safetensors file(s))")


if __name__ == "__main__":
    _define_flags()
    cli.run(_main)
