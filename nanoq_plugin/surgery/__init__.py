"""Layer surgery on decoder blocks: drop, swap and duplicate blocks, write the result as a plain Hugging Face
checkpoint, and search for the best surgery by perplexity and a factual question suite.

- `plan`: `--drop/--swap/--duplicate` parsed and validated into a `LayerMap` (new block -> source block).
- `layer_fields`: the config fields that say something per block (per-layer lists, index patterns, index lists),
  read off transformers' own config class.
- `config`: the config of the surgered model (num_hidden_layers and those fields rewritten).
- `verify`: the check that transformers builds every new block as its source block (meta device).
- `apply`: the checkpoint writer (streams tensors, one at a time, into a temp dir renamed into place).
- `inmemory`: the same surgery applied to a loaded transformers model, for evaluation without writing.
- `qa`: the question suite (greedy, chat template, exact match after normalisation).
- `candidates`, `cache`, `search`, `report`: the eval-driven search, its resumable cache and its table.
"""
