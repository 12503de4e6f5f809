"""config.validate: every bad value named before a run writes anything; experiment
files need an explicit variant."""
import importlib.util
import os

import pytest

from dllm import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(c=None, **changes):
    """`c` (default: the base config; 8 CPU devices: mesh data 8) with changes given
    as section__key=value."""
    c = config_lib.base_config() if c is None else c
    for key, value in changes.items():
        section, name = key.split("__")
        c[section][name] = value
    return c


def test_the_base_config_and_every_experiment_variant_validate():
    config_lib.validate(_config())
    for name, variants in (("pretrain", ("tiny", "adapt", "7b")),
                           ("sft", ("tiny", "tasks_tiny", "7b")), ("midtrain", ("tiny", "7b")),
                           ("coupled_grpo", ("tiny", "decoupled_tiny", "full_mask_tiny",
                                             "d1_tiny", "7b"))):
        spec = importlib.util.spec_from_file_location(name, f"{ROOT}/experiments/{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        for variant in variants:
            config = module.get_config(variant)
            config.init.checkpoint = ""     # midtrain's tiny names a run made by pretrain
            if name == "coupled_grpo" and variant == "7b":
                config.grpo.tasks = "synthetic:rl"   # the recipe's is the user's jsonl
            config.data.path = config.data.path if config.data.source != "sft" else \
                f"{ROOT}/{config.data.path}"
            config_lib.validate(config)
        with pytest.raises(ValueError, match=rf"experiments/{name}.py: variant ''; pass one of "
                                             rf"{', '.join(variants)}"):
            module.get_config()


@pytest.mark.parametrize("changes,message", [
    (dict(train__steps=0), r"train.steps=0; must be >= 1"),
    (dict(train__steps=-5), r"train.steps=-5; must be >= 1"),
    (dict(loss__schedule="bogus"), r"loss.schedule='bogus'; allowed: \('linear'"),
    (dict(train__batch_size=12), r"train.batch_size=12 does not split into train.microbatches=1"
                                 r" x 8 data-parallel devices \(mesh data 8 x fsdp 1\); use a "
                                 r"multiple of 8"),
    (dict(train__batch_size=16, train__microbatches=4),
     r"train.batch_size=16 does not split into train.microbatches=4 x 8"),
    (dict(data__source="bogus"), r"data.source='bogus'; allowed: \('stdlib'"),
    (dict(data__source="text", data__path="/nowhere/x"), r"data path '/nowhere/x'"),
    (dict(data__tokenizer="/nowhere/tokenizer.model"), r"data.tokenizer='/nowhere/tokenizer"),
    (dict(data__eval_fraction=1.0), r"data.eval_fraction=1.0; must be in \[0, 1\)"),
    (dict(sample__max_new_tokens=256), r"sample.max_new_tokens=256 does not fit the context "
                                       r"the model is trained at \(data.seq_len=256\)"),
    (dict(sample__alg="bogus"), r"sample.alg='bogus'"),
    (dict(model__heads=3), r"model.heads=3 must be a multiple of model.kv_heads=2"),
    (dict(checkpoint__every=0), r"checkpoint.every=0"),
    (dict(init__checkpoint="/nowhere"), r"init.checkpoint='/nowhere' is not a run directory"),
    (dict(init__hf_dir="/nowhere", init__checkpoint="/x"), r"init.checkpoint and init.hf_dir"),
    (dict(init__warmup="/nowhere/x.py:tiny"), r"experiment '/nowhere/x.py:tiny': no file"),
    (dict(data__sft_response_len=32), r"data.sft_response_len=32: for the sources \('sft', "
                                      r"'tasks'\) only"),
], ids=lambda x: str(x)[:40])
def test_a_bad_value_is_named(changes, message):
    with pytest.raises((ValueError, KeyError, FileNotFoundError), match=message):
        config_lib.validate(_config(**changes))


def test_an_unknown_stage_is_named():
    config = _config()
    config.stage = "bogus"
    with pytest.raises(ValueError, match=r"stage='bogus'; allowed: \['elbo', 'grpo'\]"):
        config_lib.validate(config)


def _grpo_config(**changes):
    c = config_lib.load_experiment(f"{ROOT}/experiments/coupled_grpo.py:tiny")
    c.init.warmup = ""
    return _config(c, **changes)


@pytest.mark.parametrize("changes,message", [
    (dict(grpo__bogus=1), r"config.grpo has unknown keys \['bogus'\]"),
    (dict(grpo__estimator="exact"), r"grpo.estimator='exact'; allowed"),
    (dict(grpo__tasks=""), r"config.grpo.tasks is empty"),
    (dict(train__batch_size=36), r"train.batch_size=36 must be a multiple of grpo.generations=8"),
    (dict(grpo__max_prompt_len=240), r"grpo.max_prompt_len=240 \+ sample.max_new_tokens=32 "
                                     r"exceeds data.seq_len=256"),
], ids=lambda x: str(x)[:40])
def test_a_bad_grpo_value_is_named(changes, message):
    config_lib.validate(_grpo_config())
    with pytest.raises((ValueError, KeyError), match=message):
        config_lib.validate(_grpo_config(**changes))
