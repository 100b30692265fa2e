"""Recipes, plans, quantization algorithms and the layer-by-layer pipeline."""
