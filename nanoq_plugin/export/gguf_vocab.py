"""The tokenizer of a Hugging Face folder as GGUF `tokenizer.*` metadata (llama.cpp's "gpt2" byte-level BPE).

What is written, as llama.cpp's convert_hf_to_gguf writes it for these models:
- `tokenizer.ggml.model = "gpt2"` and `tokenizer.ggml.pre`, the name llama.cpp gives the pre-tokenizer
  (how text is split before the merges). It is read off `tokenizer.json`'s `pre_tokenizer` by matching a
  known structure (`PRE_TOKENIZERS`); an unknown one is refused rather than guessed, since a wrong split
  silently changes token ids.
- `tokenizer.ggml.tokens`: one string per id up to the model's `vocab_size` (ids with no token are written
  as `[PAD{id}]`, type UNUSED), in the byte-level spelling of `tokenizer.json`;
  `tokenizer.ggml.token_type`: CONTROL for special added tokens, USER_DEFINED for other added tokens,
  NORMAL otherwise; `tokenizer.ggml.merges`.
- bos / eos / unk / padding ids, whether BOS / EOS are added when encoding (from the post-processor), and
  `tokenizer.chat_template`. Merges, ids and template are parsed with gguf-py's own `SpecialVocab`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import NanoqError

_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")

# llama.cpp pre-tokenizer name -> the tokenizer.json pre_tokenizer steps that split text the same way
PRE_TOKENIZERS: dict[str, tuple[tuple, ...]] = {
    "gpt-2": (("ByteLevel", True),),
    "smollm": (("Digits", True), ("ByteLevel", True)),
    "qwen2": (("Split", _QWEN2_SPLIT, "isolated", False), ("ByteLevel", False)),
    "llama-bpe": (("Split", _LLAMA3_SPLIT, "isolated", False), ("ByteLevel", False)),
}

TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5


def _step_signature(step: dict, where: str) -> tuple:
    kind = step.get("type")
    if kind == "ByteLevel":
        if step.get("add_prefix_space"):
            raise NanoqError(f"{where}: ByteLevel with add_prefix_space has no llama.cpp equivalent")
        return ("ByteLevel", bool(step.get("use_regex", True)))
    if kind == "Digits":
        return ("Digits", bool(step.get("individual_digits")))
    if kind == "Split":
        pattern = step.get("pattern", {})
        return ("Split", pattern.get("Regex", pattern.get("String")), str(step.get("behavior", "")).lower(),
                bool(step.get("invert")))
    return (kind,)


def llama_cpp_pre_tokenizer(tokenizer_json: dict, where: str) -> str:
    """The llama.cpp `tokenizer.ggml.pre` name of a tokenizer.json; NanoqError naming `where` if none fits."""
    pre = tokenizer_json.get("pre_tokenizer")
    if not isinstance(pre, dict):
        raise NanoqError(f"{where}: no pre_tokenizer: not a byte-level BPE tokenizer llama.cpp can split alike")
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    signature = tuple(_step_signature(step, where) for step in steps)
    for name, known in PRE_TOKENIZERS.items():
        if signature == known:
            return name
    raise NanoqError(f"{where}: pre_tokenizer {[s[0] for s in signature]} matches none llama.cpp names here "
                     f"(known: {', '.join(PRE_TOKENIZERS)}); refusing to guess how it splits text")


def _adds(post_processor: dict | None, position: int) -> str | None:
    """The special token a TemplateProcessing post-processor puts first (0) or last (-1) in a single text."""
    if not post_processor:
        return None
    for processor in post_processor.get("processors", [post_processor]):
        if processor.get("type") == "TemplateProcessing":
            single = processor.get("single", [])
            if single and "SpecialToken" in single[position]:
                return single[position]["SpecialToken"]["id"]
    return None


@dataclass
class GgufVocab:
    """Everything the writer needs: tokens and types (len == vocab_size), merges, ids, flags, template."""

    pre: str
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    special_ids: dict[str, int] = field(default_factory=dict)
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | list | None = None  # a list holds named templates, as gguf-py reads them

    def add_to(self, writer) -> None:
        """Write the `tokenizer.*` keys into a `gguf.GGUFWriter`."""
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.token_types)
        writer.add_token_merges(self.merges)
        for kind, token_id in self.special_ids.items():
            getattr(writer, f"add_{kind}_token_id")(token_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.chat_template is not None:
            writer.add_chat_template(self.chat_template)


def read_vocab(model_dir: Path, vocab_size: int) -> GgufVocab:
    """The GGUF tokenizer metadata of `model_dir` for a model with `vocab_size` embedding rows."""
    from gguf.vocab import SpecialVocab

    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise NanoqError(f"{model_dir}: no tokenizer.json (the GGUF file carries the tokenizer: export from a "
                         "folder that has its fast tokenizer)")
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data.get("model", {})
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        raise NanoqError(f"{path}: a SentencePiece-style tokenizer (BPE with byte_fallback, as Gemma, Mistral v0.x and "
                         "Phi-3 have), llama.cpp's 'llama' tokenizer model, which is not exported: only byte-level "
                         "BPE ('gpt2')")
    if model.get("type") != "BPE" or (data.get("decoder") or {}).get("type") != "ByteLevel":
        raise NanoqError(f"{path}: not a byte-level BPE tokenizer (model {model.get('type')!r}); only llama.cpp's "
                         "'gpt2' tokenizer model is exported")
    if data.get("normalizer") is not None:
        raise NanoqError(f"{path}: has a normalizer ({data['normalizer'].get('type')}), which llama.cpp's byte-level "
                         "BPE does not apply")
    pre = llama_cpp_pre_tokenizer(data, str(path))

    by_id = {index: token for token, index in model["vocab"].items()}
    types = {}
    for added in data.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        types[added["id"]] = TOKEN_CONTROL if added.get("special") else TOKEN_USER_DEFINED
    if max(by_id) >= vocab_size:
        raise NanoqError(f"{path}: token id {max(by_id)} does not fit the model's vocab_size {vocab_size}")
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    token_types = [types.get(i, TOKEN_NORMAL if i in by_id else TOKEN_UNUSED) for i in range(vocab_size)]

    special = SpecialVocab(model_dir, load_merges=True, special_token_types=("bos", "eos", "unk", "pad"),
                           n_vocab=vocab_size)
    if not special.merges:
        raise NanoqError(f"{path}: no merges")
    token_of = {token: index for index, token in by_id.items()}
    first, last = _adds(data.get("post_processor"), 0), _adds(data.get("post_processor"), -1)
    ids = special.special_token_ids
    return GgufVocab(
        pre=pre, tokens=tokens, token_types=token_types, merges=list(special.merges), special_ids=dict(ids),
        add_bos=first is not None and token_of.get(first) == ids.get("bos"),
        add_eos=last is not None and token_of.get(last) == ids.get("eos"),
        chat_template=special.chat_template,
    )
