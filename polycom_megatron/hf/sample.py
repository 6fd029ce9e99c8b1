"""Loading an exported model and sampling from it: a short greedy continuation."""

from __future__ import annotations

from pathlib import Path


def load(model_dir, dtype=None):
    """(model, tokenizer or None) of an exported directory, through the Auto classes."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    import polycom_megatron.hf  # noqa: F401  (registers the classes)

    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype or torch.float32).eval()
    tokenizer = None
    if (Path(model_dir) / "tokenizer.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return model, tokenizer


def greedy_text(model_dir, prompt: str, max_new_tokens: int = 24) -> str:
    """The greedy continuation of ``prompt`` (the prompt itself excluded)."""
    import torch

    model, tokenizer = load(model_dir)
    if tokenizer is None:
        raise ValueError(f"{model_dir} has no tokenizer to encode a prompt with")
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
