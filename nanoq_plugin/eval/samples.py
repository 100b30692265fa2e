"""Greedy generations from fixed prompts, to show side by side in the model card."""

from __future__ import annotations

import torch

SAMPLE_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "In 1905, Albert Einstein published",
)


@torch.inference_mode()
def greedy_samples(model, tokenizer, prompts=SAMPLE_PROMPTS, max_new_tokens: int = 32) -> list[dict]:
    """Greedy continuation of each prompt: `[{"prompt", "text", "token_ids"}]`."""
    samples = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(model.device)
        out = model.generate(
            ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id
        )
        new = out[0, ids.shape[1]:].tolist()
        samples.append({"prompt": prompt, "text": tokenizer.decode(new, skip_special_tokens=True), "token_ids": new})
    return samples
