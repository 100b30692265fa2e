"""Evaluation: sliding-window perplexity, logit similarity to a base model, greedy samples, model card."""
