"""Rebuild a Hugging Face ``tokenizer.json`` from the vocabulary stored in a GGUF file.

GGUF keeps only the raw ingredients (token strings, their types, BPE merges or SentencePiece
scores, the pre-tokenizer's name and the special token ids); this module reassembles them into
a :class:`tokenizers.Tokenizer` that encodes exactly like the original Hugging Face tokenizer:

- ``tokenizer.ggml.model == "gpt2"``: byte-level BPE; the pre-tokenizer is chosen by
  ``tokenizer.ggml.pre`` (see :data:`PRE_TOKENIZERS`).
- ``tokenizer.ggml.model == "llama"``: SentencePiece BPE, rebuilt as a byte-fallback BPE whose
  merges are derived from the vocabulary and the piece scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, processors
from tokenizers import pre_tokenizers as pre

from ..errors import TokenizerError, UnsupportedModelError

# llama.cpp's token types (``tokenizer.ggml.token_type``).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# End-of-turn markers of common chat formats (ChatML, Llama 3, Gemma); a chat model stops on
# them even when the GGUF names another token as eos.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>")

_LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# ``tokenizer.ggml.pre`` value -> pre-tokenizer family (the names llama.cpp's converter writes).
PRE_TOKENIZERS: dict[str, str] = {
    "default": "gpt2",
    "gpt-2": "gpt2",
    "gpt2": "gpt2",
    # SmolLM reuses StarCoder's tokenizer: every digit on its own, then the GPT-2 regex.
    "smollm": "digits",
    "starcoder": "digits",
    "llama-bpe": "llama3",
    "llama3": "llama3",
    "llama-v3": "llama3",
    "qwen2": "qwen2",
}


@dataclass(frozen=True)
class GGUFVocab:
    """The tokenizer part of a GGUF file's metadata (``tokenizer.ggml.*`` and the template)."""

    model: str
    tokens: tuple[str, ...]
    token_types: tuple[int, ...] | None = None
    scores: tuple[float, ...] | None = None
    merges: tuple[str, ...] | None = None
    pre: str | None = None
    bos_id: int | None = None
    eos_id: int | None = None
    unk_id: int | None = None
    pad_id: int | None = None
    eot_id: int | None = None
    add_bos: bool | None = None
    add_eos: bool | None = None
    add_space_prefix: bool | None = None
    chat_template: str | None = None

    def __post_init__(self) -> None:
        n = len(self.tokens)
        if n == 0:
            raise TokenizerError("GGUF vocabulary is empty")
        for what, values in (("token_type", self.token_types), ("scores", self.scores)):
            if values is not None and len(values) != n:
                raise TokenizerError(
                    f"GGUF tokenizer.ggml.{what} has {len(values)} entries for {n} tokens"
                )
        for what in ("bos_id", "eos_id", "unk_id", "pad_id", "eot_id"):
            value = getattr(self, what)
            if value is not None and not 0 <= value < n:
                raise TokenizerError(f"GGUF {what} {value} is outside the {n}-token vocabulary")

    def token(self, token_id: int | None) -> str | None:
        return None if token_id is None else self.tokens[token_id]

    def type_of(self, token_id: int) -> int:
        return NORMAL if self.token_types is None else self.token_types[token_id]


def build_tokenizer(vocab: GGUFVocab) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` equivalent to the one the GGUF file was made from."""
    if vocab.model == "gpt2":
        tok = _byte_level_bpe(vocab)
    elif vocab.model == "llama":
        tok = _sentencepiece_bpe(vocab)
    else:
        raise UnsupportedModelError(
            f"GGUF tokenizer model {vocab.model!r} is not supported (supported: gpt2, llama)"
        )
    # Control tokens are matched in raw text before the model sees it, like llama.cpp does with
    # parse_special; user-defined ones too, but they are ordinary text when decoding.
    special, user = [], []
    for i, text in enumerate(vocab.tokens):
        kind = vocab.type_of(i)
        if kind in (CONTROL, UNKNOWN) and text:
            special.append(AddedToken(text, special=True, normalized=False))
        elif kind == USER_DEFINED and text:
            user.append(AddedToken(text, special=False, normalized=False))
    tok.add_special_tokens(special)
    tok.add_tokens(user)
    bos = _flag(vocab.add_bos, default=vocab.model == "llama") and vocab.bos_id is not None
    eos = _flag(vocab.add_eos, default=False) and vocab.eos_id is not None
    if bos or eos:
        tok.post_processor = _template(vocab, bos, eos)
    elif vocab.model == "gpt2":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def tokenizer_config(vocab: GGUFVocab, model_max_length: int) -> dict[str, Any]:
    """``tokenizer_config.json``: special tokens as strings, BOS/EOS policy and chat template."""
    cfg: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": _flag(vocab.add_bos, default=vocab.model == "llama"),
        "add_eos_token": _flag(vocab.add_eos, default=False),
        "bos_token": vocab.token(vocab.bos_id),
        "eos_token": vocab.token(vocab.eos_id),
        "unk_token": vocab.token(vocab.unk_id),
        "pad_token": vocab.token(vocab.pad_id),
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
    }
    if vocab.chat_template:
        cfg["chat_template"] = vocab.chat_template
    return cfg


def stop_token_ids(vocab: GGUFVocab) -> list[int]:
    """Ids that end generation: eos, the GGUF's end-of-turn token and known chat end markers."""
    ids = [i for i in (vocab.eos_id, vocab.eot_id) if i is not None]
    wanted = set(END_OF_TURN_TOKENS)
    # Scan only control/user-defined tokens: chat markers are never ordinary vocabulary entries.
    for i, text in enumerate(vocab.tokens):
        if text in wanted and vocab.type_of(i) in (CONTROL, USER_DEFINED) and i not in ids:
            ids.append(i)
    return ids


def generation_config(vocab: GGUFVocab) -> dict[str, Any]:
    """``generation_config.json`` with ``eos_token_id`` an int, or a list when there are several."""
    cfg: dict[str, Any] = {}
    if vocab.bos_id is not None:
        cfg["bos_token_id"] = vocab.bos_id
    stops = stop_token_ids(vocab)
    if stops:
        cfg["eos_token_id"] = stops[0] if len(stops) == 1 else stops
    if vocab.pad_id is not None:
        cfg["pad_token_id"] = vocab.pad_id
    return cfg


def _flag(value: bool | None, default: bool) -> bool:
    return default if value is None else bool(value)


def _vocab_ids(tokens: Sequence[str]) -> dict[str, int]:
    # A GGUF may list the same string twice; the first id wins so that every string has one id.
    ids: dict[str, int] = {}
    for i, text in enumerate(tokens):
        ids.setdefault(text, i)
    return ids


def _byte_level_bpe(vocab: GGUFVocab) -> Tokenizer:
    if vocab.merges is None:
        raise TokenizerError("GGUF byte-level BPE tokenizer has no tokenizer.ggml.merges")
    family = PRE_TOKENIZERS.get(vocab.pre or "default")
    if family is None:
        raise UnsupportedModelError(
            f"GGUF pre-tokenizer {vocab.pre!r} is not supported "
            f"(supported: {', '.join(sorted(PRE_TOKENIZERS))})"
        )
    ids = _vocab_ids(vocab.tokens)
    merges = []
    for line in vocab.merges:
        # llama.cpp splits at the first space after the first character, so a merge whose
        # left part is itself a space still parses.
        cut = line.find(" ", 1)
        if cut < 0:
            raise TokenizerError(f"GGUF merge {line!r} is not two space-separated tokens")
        left, right = line[:cut], line[cut + 1:]
        if left not in ids or right not in ids:
            raise TokenizerError(f"GGUF merge {line!r} names a token missing from the vocabulary")
        merges.append((left, right))
    try:
        model = models.BPE(
            ids, merges, fuse_unk=False, byte_fallback=False,
            # Llama 3 looks whole words up in the vocabulary before merging (llama.cpp too).
            ignore_merges=family == "llama3",
        )
    except Exception as err:  # the Rust side reports bad vocabularies as plain Exceptions
        raise TokenizerError(f"GGUF vocabulary cannot form a BPE model: {err}") from None
    tok = Tokenizer(model)
    byte_level_regex = pre.ByteLevel(add_prefix_space=False, use_regex=True)
    if family == "gpt2":
        tok.pre_tokenizer = byte_level_regex
    elif family == "digits":
        tok.pre_tokenizer = pre.Sequence([pre.Digits(individual_digits=True), byte_level_regex])
    else:
        pattern = _LLAMA3_PATTERN if family == "llama3" else _QWEN2_PATTERN
        tok.pre_tokenizer = pre.Sequence([
            pre.Split(Regex(pattern), behavior="isolated", invert=False),
            pre.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        if family == "qwen2":
            tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    return tok


def sentencepiece_merges(vocab: GGUFVocab) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece's score-driven merging.

    SentencePiece repeatedly joins the adjacent pair whose concatenation is the highest-scoring
    piece in the vocabulary. Listing every split of every normal piece into two normal pieces,
    ranked by the joined piece's score, makes a BPE model take the same steps.
    """
    if vocab.scores is None:
        raise TokenizerError("GGUF SentencePiece tokenizer has no tokenizer.ggml.scores")
    normal = {
        text: i for i, text in enumerate(vocab.tokens)
        if vocab.type_of(i) == NORMAL and text
    }
    ranked = []
    for piece, pid in normal.items():
        score = vocab.scores[pid]
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-score, normal[left], normal[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _sentencepiece_bpe(vocab: GGUFVocab) -> Tokenizer:
    unk = vocab.token(vocab.unk_id)
    if unk is None and "<unk>" in vocab.tokens:
        unk = "<unk>"
    try:
        model = models.BPE(
            _vocab_ids(vocab.tokens), sentencepiece_merges(vocab), unk_token=unk,
            fuse_unk=True, byte_fallback=True,
        )
    except TokenizerError:
        raise
    except Exception as err:
        raise TokenizerError(f"GGUF vocabulary cannot form a BPE model: {err}") from None
    tok = Tokenizer(model)
    space_prefix = _flag(vocab.add_space_prefix, default=True)
    # llama.cpp escapes spaces as U+2581 and, with add_space_prefix, puts one in front of every
    # run of text (also after a special token) -- which is what a Prepend normalizer does.
    steps = [normalizers.Replace(" ", "▁")]
    if space_prefix:
        steps.insert(0, normalizers.Prepend("▁"))
    tok.normalizer = normalizers.Sequence(steps)
    dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if space_prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(dec)
    return tok


def _template(vocab: GGUFVocab, bos: bool, eos: bool) -> processors.TemplateProcessing:
    b, e = vocab.token(vocab.bos_id), vocab.token(vocab.eos_id)
    pre_a = [f"{b}:0"] if bos else []
    post_a = [f"{e}:0"] if eos else []
    pre_b = [f"{b}:1"] if bos else []
    post_b = [f"{e}:1"] if eos else []
    specials = []
    if bos:
        specials.append((b, vocab.bos_id))
    if eos and (e, vocab.eos_id) not in specials:
        specials.append((e, vocab.eos_id))
    return processors.TemplateProcessing(
        single=" ".join([*pre_a, "$A:0", *post_a]),
        pair=" ".join([*pre_a, "$A:0", *post_a, *pre_b, "$B:1", *post_b]),
        special_tokens=specials,
    )


def tokenizer_json(vocab: GGUFVocab) -> str:
    """The serialized ``tokenizer.json`` text."""
    return build_tokenizer(vocab).to_str()
