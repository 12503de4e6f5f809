"""dllm: masked diffusion language models for code, in JAX/Flax."""
