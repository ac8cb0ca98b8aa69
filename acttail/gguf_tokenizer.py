"""The tokenizer of a GGUF file, rebuilt as HF ``tokenizers`` do (and as transformers' GGUF loader does):
byte-level BPE (``gpt2``) with the file's merges and pre-tokenizer, or SentencePiece (``llama``) as BPE with
byte fallback and merges implied by the vocabulary.

Every metadata value is checked (``gguf_file.get``) before the tokenizers library sees it, and what the
library still refuses becomes one ActTailError.
"""

from __future__ import annotations

import contextlib

from .errors import ActTailError
from .gguf_file import GEMMA, get

# Pre-tokenizer regexes of llama.cpp's BPE "pre" types we support (HF tokenizer.json equivalents).
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")


MAX_PIECE = 1024  # characters of a SentencePiece token: its merges are every split of it in two


def hf_tokenizer(reader) -> tuple[str, dict]:
    """tokenizer.json (HF tokenizers) and tokenizer_config.json for the GGUF's tokenizer: byte-level BPE
    (``gpt2``) or SentencePiece (``llama``). The tokenizer puts BOS (and EOS) around a text when the GGUF
    says so (tokenizer.ggml.add_bos_token; llama.cpp's default: yes for SentencePiece, no for BPE), and
    tokenizer_config.json says it too, as transformers reads it."""
    kind = get(reader, "tokenizer.ggml.model", "str", None)
    if kind not in ("gpt2", "llama"):
        raise ActTailError(f"GGUF tokenizer model {kind!r} is not supported (gpt2: byte-level BPE, llama: "
                           "SentencePiece)")
    tokens = get(reader, "tokenizer.ggml.tokens", "strs")
    types = get(reader, "tokenizer.ggml.token_type", "ints", None) or [1] * len(tokens)
    if not tokens or len(types) != len(tokens):
        raise ActTailError(f"the GGUF has {len(tokens)} tokens and {len(types)} token types (needs one type "
                           "a token, and some tokens)")
    if kind == "gpt2":
        tok = _byte_level_bpe(reader, tokens)
        _add_tokens(tok, [t for t, ty in zip(tokens, types) if ty == 3], [])
    else:
        if get(reader, "general.architecture", "str") in GEMMA:
            tokens = _spell_spaces(tokens)
        tok = _sentencepiece(reader, tokens)
        _add_tokens(tok, [t for t, ty in zip(tokens, types) if ty in (2, 3)],  # unknown and control
                    [t for t, ty in zip(tokens, types) if ty == 4])  # user-defined: matched whole
    add_bos = get(reader, "tokenizer.ggml.add_bos_token", "bool", kind == "llama")
    add_eos = get(reader, "tokenizer.ggml.add_eos_token", "bool", False)
    ids = {role: i for role, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding"))
           if (i := get(reader, f"tokenizer.ggml.{key}_token_id", "int", None, 0)) is not None and i < len(tokens)}
    names = {f"{role}_token": tokens[i] for role, i in ids.items()}
    ends = [role for role, add in (("bos", add_bos), ("eos", add_eos)) if add]
    if any(role not in ids for role in ends):
        raise ActTailError(f"the GGUF asks for {' and '.join(ends).upper()} around every text but gives no token id")
    if ends:
        tok.post_processor = _template(names, ids, ends)
    config = {"add_bos_token": add_bos, "add_eos_token": add_eos, **names,
              "tokenizer_class": "PreTrainedTokenizerFast"}
    with _library("writing tokenizer.json"):
        return tok.to_str(pretty=True), config


@contextlib.contextmanager
def _library(step: str):
    """Whatever the tokenizers library refuses in ``step`` (an exception, or a Rust panic, which Python sees
    as a BaseException) becomes one ActTailError."""
    try:
        yield
    except (ActTailError, KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as e:  # noqa: B036 (pyo3's PanicException is a BaseException)
        raise ActTailError(f"cannot build the GGUF's tokenizer ({step}): {type(e).__name__}: {str(e)[:160]}") from None


def _add_tokens(tok, special: list[str], user: list[str]) -> None:
    from tokenizers import AddedToken

    with _library("adding special tokens"):
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])


def _template(names: dict, ids: dict, ends: list[str]):
    """The post-processor that puts BOS before (and EOS after) every text, as TemplateProcessing writes
    it: a token named with ':' or a leading '$' would be read as part of the template's syntax."""
    from tokenizers import processors

    for role in ends:
        name = names[f"{role}_token"]
        if ":" in name or name.startswith("$") or not name.strip():
            raise ActTailError(f"the GGUF's {role.upper()} token {name[:40]!r} cannot be named in a tokenizer "
                               "template (':', a leading '$' or only spaces)")
    single = ([names["bos_token"]] if "bos" in ends else []) + ["$A"] + ([names["eos_token"]] if "eos" in ends else [])
    with _library("the BOS/EOS template"):
        return processors.TemplateProcessing(single=single, special_tokens=[(names[f"{r}_token"], ids[r]) for r in ends])


def _byte_level_bpe(reader, tokens):
    """Byte-level BPE (GPT-2 style) with the GGUF's merges and its pre-tokenizer (smollm, qwen2, gpt2)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    merges = []
    for i, m in enumerate(get(reader, "tokenizer.ggml.merges", "strs")):
        left, space, right = m.partition(" ")
        if not (left and space and right):
            raise ActTailError(f"GGUF BPE merge {i} ({m[:40]!r}) is not two tokens separated by a space")
        merges.append((left, right))
    pre = get(reader, "tokenizer.ggml.pre", "str", "default")
    if pre not in ("smollm", "qwen2", "default", "gpt-2", "gpt2"):
        raise ActTailError(f"GGUF BPE pre-tokenizer {pre[:40]!r} is not supported (smollm, qwen2, gpt2)")
    with _library("byte-level BPE"):
        tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if pre == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre == "qwen2":
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    return tok


def _spell_spaces(tokens: list[str]) -> list[str]:
    """Gemma's GGUFs store the tokens that are runs of spaces with real spaces; SentencePiece, and so the
    tokenizer's normalizer and merges, spell them with U+2581 (as transformers' GGUF loader does)."""
    return ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]


def _sentencepiece(reader, tokens):
    """A SentencePiece vocabulary as BPE with byte fallback, as llama.cpp runs it (pairs merged best first)
    and transformers rebuilds it: merges from every split of a token into two tokens, ordered by the
    token's score, or for Gemma by its position in the file (Gemma's scores do not follow its merge order).
    Spaces become U+2581; a space is put before the text when the GGUF says so (add_space_prefix, llama.cpp's
    default yes; Gemma no)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    arch = get(reader, "general.architecture", "str")
    long = next((t for t in tokens if len(t) > MAX_PIECE), None)
    if long is not None:
        raise ActTailError(f"the GGUF's SentencePiece token {long[:20]!r}... is over {MAX_PIECE} characters")
    if arch in GEMMA:
        priority = {t: -i for i, t in enumerate(tokens)}
    else:
        scores = get(reader, "tokenizer.ggml.scores", "numbers")
        if len(scores) != len(tokens):
            raise ActTailError(f"the GGUF has {len(tokens)} tokens and {len(scores)} token scores")
        priority = dict(zip(tokens, scores))
    unk = get(reader, "tokenizer.ggml.unknown_token_id", "int", None, 0)
    if unk is not None and unk >= len(tokens):
        raise ActTailError(f"the GGUF's unknown token id {unk} is outside its {len(tokens)} tokens")
    with _library("SentencePiece BPE"):
        tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                                   merges=sentencepiece_merges(tokens, priority),
                                   unk_token=tokens[unk] if unk is not None else None, fuse_unk=True,
                                   byte_fallback=True))
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if get(reader, "tokenizer.ggml.add_space_prefix", "bool", arch not in GEMMA):
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
        steps.append(decoders.Strip(content=" ", left=1))
    else:
        tok.normalizer = normalizers.Replace(" ", "\u2581")
        tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    tok.decoder = decoders.Sequence(steps)
    return tok


def sentencepiece_merges(tokens: list[str], priority: dict) -> list[tuple[str, str]]:
    """BPE merges implied by a vocabulary: each way to split a token into two tokens, the token with the
    highest ``priority`` first (ties: longer left part, then longer right part; within a token, by the
    parts' ids), as transformers' ``generate_merges`` orders them."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for piece, score in priority.items():
        local = [(piece[:i], piece[i:], score) for i in range(1, len(piece))
                 if piece[:i] in vocab and piece[i:] in vocab]
        merges += sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]
