"""The PyTorch peer of dllm's train step, for side-by-side benchmarks: transformers'
Qwen2 of the same shape made bidirectional, the same pretraining ELBO loss (linear
schedule: each token masked with probability t, weight 1/t, antithetic t, Dream's
shifted logits, float32 cross-entropy, divided by the token count), AdamW after
global-norm clipping to 1.0. On a GPU: bfloat16 autocast and fused AdamW.

attention="mask" passes a [B, 1, S, S] all-True mask (what a padded batch costs
SDPA: no flash kernel); "nomask" sets every layer non-causal and passes no mask
(SDPA may then pick its flash kernel): the peer's best setting where it matters.
"""
from __future__ import annotations

import time

import torch
import transformers


def qwen2_config(cfg) -> transformers.Qwen2Config:
    """The Qwen2 config of a dllm ModelConfig's shape."""
    return transformers.Qwen2Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden, intermediate_size=cfg.mlp,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_dim, rope_theta=cfg.rope_theta,
        rms_norm_eps=cfg.rms_eps, tie_word_embeddings=cfg.tie_embeddings,
        max_position_embeddings=32768, attn_implementation="sdpa")


class Peer:
    """One model, optimizer and random batch; `step()` runs one optimizer step."""

    def __init__(self, cfg, batch: int, seq: int, attention: str = "mask", seed: int = 0):
        if attention not in ("mask", "nomask"):
            raise ValueError(f"peer attention {attention!r}; allowed: mask, nomask")
        torch.manual_seed(seed)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        with torch.device(self.device):   # initialised where it runs (1.5B on a CPU is slow)
            self.model = transformers.Qwen2ForCausalLM(qwen2_config(cfg))
        if attention == "nomask":
            for module in self.model.modules():
                if hasattr(module, "is_causal"):
                    module.is_causal = False
        gpu = self.device == "cuda"
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.01,
                                     fused=gpu)
        self.mask_id = cfg.vocab_size - 1
        self.tokens = torch.randint(0, self.mask_id, (batch, seq), device=self.device)
        self.mask = (torch.ones(batch, 1, seq, seq, dtype=torch.bool, device=self.device)
                     if attention == "mask" else None)
        self.autocast = torch.autocast(self.device, torch.bfloat16, enabled=gpu)

    def loss(self):
        b, s = self.tokens.shape
        u = torch.rand((), device=self.device)
        t = 1e-3 + (1 - 1e-3) * torch.remainder(u + torch.arange(b, device=self.device) / b, 1.0)
        masked = torch.rand(b, s, device=self.device) < t[:, None]
        noisy = torch.where(masked, self.mask_id, self.tokens)
        with self.autocast:
            logits = self.model(input_ids=noisy, attention_mask=self.mask).logits
        logits = torch.cat([logits[:, :1], logits[:, :-1]], 1).float()  # Dream's shift
        nll = torch.nn.functional.cross_entropy(logits.reshape(b * s, -1),
                                                self.tokens.reshape(-1), reduction="none")
        return (nll.reshape(b, s) * masked / t[:, None]).sum() / (b * s)

    def step(self) -> float:
        loss = self.loss()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        return float(loss.detach())  # synchronises

    def timed_step(self) -> tuple[float, float]:
        """(wall s, process CPU s) of one step."""
        wall, cpu = time.perf_counter(), time.process_time()
        self.step()
        return time.perf_counter() - wall, time.process_time() - cpu

    def peak_bytes(self) -> int | None:
        """Peak GPU memory allocated since this peer was made (None on CPU)."""
        return torch.cuda.max_memory_allocated() if self.device == "cuda" else None

    @staticmethod
    def release() -> None:
        """Returns a deleted peer's cached GPU memory to the device."""
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
