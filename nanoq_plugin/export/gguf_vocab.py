"""The tokenizer of a Hugging Face folder as GGUF `tokenizer.*` metadata, as llama.cpp's convert_hf_to_gguf
writes it: a SentencePiece model (`tokenizer.model`, llama.cpp's "llama" tokenizer) for the families whose
converter reads one, otherwise the byte-level BPE of `tokenizer.json` (llama.cpp's "gpt2").

SentencePiece (`read_sentencepiece_vocab`), as the converter's `_create_vocab_sentencepiece`:
- `tokenizer.ggml.model = "llama"`, `tokenizer.ggml.pre = "default"`; one token per id up to the model's
  `vocab_size` (ids past the SentencePiece model are `[PAD{id}]`, UNUSED, score -10000), each with its
  SentencePiece score (llama.cpp merges the pair whose token scores highest) and type (NORMAL, UNKNOWN,
  CONTROL, UNUSED, BYTE).
- Added tokens (`added_tokens.json`, `tokenizer_config.json`'s `added_tokens_decoder`) replace their ids:
  CONTROL when special or shaped like a control token (`<|...|>`, `<unused..>`, ...), otherwise
  USER_DEFINED with SentencePiece's `▁` written as a space; score -1000. So do those only `tokenizer.json`
  lists where the SentencePiece model has a plain piece (transformers 5 writes its added tokens nowhere
  else; the converter reads them only for Phi-3, whose added tokens are all taken from there as they are).
- `tokenizer.ggml.add_space_prefix = false` when the SentencePiece model adds no word marker in front of the
  text (Gemma's; llama.cpp's default is to add one, as Llama's and Mistral's do). llama.cpp's converter
  writes false for every Gemma instead of asking the model.

Byte-level BPE (`read_vocab`):
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

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import NanoqError
from ..format.checkpoint import read_json

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

TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6


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


def _post_processor_adds(tokenizer_json: dict, tokens: list[str], ids: dict[str, int]) -> dict[str, bool]:
    """{"bos": ..., "eos": ...}: whether the tokenizer.json post-processor puts the BOS / EOS token first / last
    in a single text; {} when it has no post-processor."""
    post_processor = tokenizer_json.get("post_processor")
    if not post_processor:
        return {}
    token_of = {token: index for index, token in enumerate(tokens)}
    first, last = _adds(post_processor, 0), _adds(post_processor, -1)
    return {"bos": first is not None and token_of.get(first) == ids.get("bos"),
            "eos": last is not None and token_of.get(last) == ids.get("eos")}


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
    """Everything the writer needs: tokens and types (len == vocab_size), then what the tokenizer model
    has: merges (byte-level BPE) or scores (SentencePiece); ids, flags (None: not written), template."""

    model: str  # llama.cpp's tokenizer model: "gpt2" or "llama"
    pre: str
    tokens: list[str]
    token_types: list[int]
    merges: list[str] = field(default_factory=list)
    scores: list[float] | None = None
    special_ids: dict[str, int] = field(default_factory=dict)
    adds: dict[str, bool] = field(default_factory=dict)  # "bos" -> whether encoding adds it (add_bos_token)
    add_space_prefix: bool | None = None
    chat_template: str | list | None = None  # a list holds named templates, as gguf-py reads them

    def add_to(self, writer) -> None:
        """Write the `tokenizer.*` keys into a `gguf.GGUFWriter`."""
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        writer.add_token_types(self.token_types)
        if self.merges:
            writer.add_token_merges(self.merges)
        for kind, token_id in self.special_ids.items():
            getattr(writer, f"add_{kind}_token_id")(token_id)
        for kind, added in self.adds.items():
            getattr(writer, f"add_add_{kind}_token")(added)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        if self.chat_template is not None:
            writer.add_chat_template(self.chat_template)


def read_vocab(model_dir: Path, vocab_size: int) -> GgufVocab:
    """The GGUF tokenizer metadata of `model_dir` for a model with `vocab_size` embedding rows."""
    from gguf.vocab import SpecialVocab

    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise NanoqError(f"{model_dir}: no tokenizer.json (the GGUF file carries the tokenizer: export from a "
                         "folder that has its fast tokenizer)")
    data = read_json(path)
    model = data.get("model", {})
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        raise NanoqError(f"{path}: a SentencePiece-style tokenizer (BPE with byte_fallback, as Gemma, Mistral v0.x and "
                         "Phi-3 have) but no tokenizer.model beside it: llama.cpp's 'llama' tokenizer is written from "
                         "the SentencePiece model (export from a folder that has it)")
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
    ids = special.special_token_ids
    return GgufVocab(
        model="gpt2", pre=pre, tokens=tokens, token_types=token_types, merges=list(special.merges),
        special_ids=dict(ids),
        adds={"bos": False, "eos": False, **_post_processor_adds(data, tokens, ids)},
        chat_template=special.chat_template,
    )


SENTENCEPIECE_FILE = "tokenizer.model"
# Added tokens llama.cpp's converter makes CONTROL even when the folder does not mark them special
_CONTROL_LOOKING = ("<pad>", "<mask>", "<2mass>", "[@BOS@]")


def _looks_like_control(token: str) -> bool:
    return (token in _CONTROL_LOOKING or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<\uff5c") and token.endswith("\uff5c>"))
            or (token.startswith("<unused") and token.endswith(">")))


def read_sentencepiece_vocab(model_dir: Path, vocab_size: int, verbatim_added_tokens: bool = False) -> GgufVocab:
    """The GGUF tokenizer metadata of the SentencePiece model in `model_dir` for a model with `vocab_size`
    embedding rows. `verbatim_added_tokens` (llama.cpp's Phi-3 converter): added tokens also come from
    tokenizer.json, are written as they are, and are CONTROL only when marked special."""
    from gguf.vocab import SpecialVocab
    from sentencepiece import SentencePieceProcessor

    path = model_dir / SENTENCEPIECE_FILE
    processor = SentencePieceProcessor()
    try:
        processor.LoadFromFile(str(path))
    except (OSError, RuntimeError) as err:
        raise NanoqError(f"{path}: not a readable SentencePiece model ({' '.join(str(err).split())[:160]})") from None
    if processor.vocab_size() > vocab_size:
        raise NanoqError(f"{path}: {processor.vocab_size()} pieces do not fit the model's vocab_size {vocab_size}")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    token_types = [TOKEN_UNUSED] * vocab_size
    for index in range(processor.vocab_size()):
        tokens[index], scores[index] = processor.IdToPiece(index), processor.GetScore(index)
        token_types[index] = (TOKEN_UNKNOWN if processor.IsUnknown(index) else TOKEN_CONTROL if processor.IsControl(index)
                              else TOKEN_UNUSED if processor.IsUnused(index) else TOKEN_BYTE if processor.IsByte(index)
                              else TOKEN_NORMAL)

    added = {}  # id -> (text, special)
    if (model_dir / "added_tokens.json").is_file():
        listed = read_json(model_dir / "added_tokens.json")
        added.update(_added_tokens(((index, text, False) for text, index in listed.items()), "added_tokens.json"))
    if (model_dir / "tokenizer_config.json").is_file():
        decoder = read_json(model_dir / "tokenizer_config.json").get("added_tokens_decoder", {})
        added.update(_added_tokens(((index, data["content"], data.get("special")) for index, data in decoder.items()),
                                   "tokenizer_config.json"))
    fast = read_json(model_dir / "tokenizer.json") if (model_dir / "tokenizer.json").is_file() else {}
    listed = _added_tokens(((data["id"], data["content"], data.get("special")) for data in fast.get("added_tokens", [])),
                           "tokenizer.json")
    for index, token in listed.items():
        # transformers 5 lists added tokens only in tokenizer.json, which llama.cpp's converter (but Phi-3's) does
        # not read: without them a special token the SentencePiece model holds as a plain piece would be cut up
        if verbatim_added_tokens or (index not in added and (index >= processor.vocab_size()
                                                              or token_types[index] == TOKEN_NORMAL)):
            added[index] = token
    for index, (text, special) in sorted(added.items()):
        if index >= vocab_size:
            raise NanoqError(f"{model_dir}: added token {text!r} has id {index}, past the model's vocab_size {vocab_size}")
        control = special or (not verbatim_added_tokens and _looks_like_control(text))
        # llama.cpp matches user-defined tokens in the raw text, so SentencePiece's word marker is a space there
        tokens[index] = text if control or verbatim_added_tokens else text.replace("\u2581", " ")
        token_types[index] = TOKEN_CONTROL if control else TOKEN_USER_DEFINED
        scores[index] = -1000.0

    special = SpecialVocab(model_dir, load_merges=False, n_vocab=vocab_size)
    adds = {**special.add_special_token, **_post_processor_adds(fast, tokens, special.special_token_ids)}
    return GgufVocab(
        model="llama", pre="default", tokens=tokens, token_types=token_types, scores=scores,
        special_ids=dict(special.special_token_ids), adds=adds,
        add_space_prefix=None if processor.EncodeAsPieces("a")[0].startswith("\u2581") else False,
        chat_template=special.chat_template,
    )


def _added_tokens(entries, where: str) -> dict[int, tuple[str, bool]]:
    """{id: (text, special)} of `(id, text, special)` entries read lazily from the file named `where`; NanoqError
    naming it when an entry lacks a field or has an id that is not an integer."""
    try:
        return {int(index): (str(text), bool(special)) for index, text, special in entries}
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise NanoqError(f"{where}: an added token entry is malformed ({type(err).__name__}: {err})") from None

