"""Fuzz the GGUF reader and the tokenizer builder: bytes as a .gguf file (raw, or a tiny GGUF whose
metadata and tensors the fuzzer edits, written with the gguf package), read as ``convert_gguf`` reads one:
the architecture from the header, the gguf reader, the HF config, the tokenizer, the dequantized tensors.

    python fuzz/gguf_reader.py -runs=1000000 fuzz/corpus/gguf
"""

import atheris

import common  # first: it sets the environment (a scratch cache, no progress bars) and imports no acttail

with atheris.instrument_imports(include=["acttail", "gguf"]):  # gguf's reader is Python: its coverage guides too
    import gguf  # noqa: F401 (imported here, so instrumented; acttail imports it lazily)
    from acttail.convert import check_architecture, hf_config, hf_tensors, open_gguf
    from acttail.errors import ActTailError
    from acttail.gguf_tokenizer import hf_tokenizer

import numpy as np  # noqa: E402
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, quants  # noqa: E402

BLOCK = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
         "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
         "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
BPE = ["<|endoftext|>", "a", "b", "c", "ab", "\u0120", "\u0120a", "\u0120ab", "1", "2"]
SPM = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{b:02X}>" for b in range(8)] + ["\u2581", "a", "b", "\u2581a", "ab",
                                                                                "\u2581ab", "  "]
EXTRA_KEYS = ["tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token", "tokenizer.ggml.scores",
              "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_space_prefix",
              "tokenizer.ggml.merges", "tokenizer.ggml.pre", "tokenizer.ggml.token_type", "{a}.rope.scaling.type",
              "{a}.rope.scaling.factor", "{a}.attention.sliding_window_pattern", "{a}.attention.key_length",
              "{a}.rope.freq_base_swa", "{a}.final_logit_softcapping", "{a}.attn_logit_softcapping",
              "{a}.attention.sliding_window", "general.architecture"]


def write_tiny(path, arch: str, tokenizer: str, pre: str = "smollm") -> bytes:
    """A one-layer GGUF of CONFIG's shape as llama.cpp writes one (F32, down_proj Q8_0), with a byte-level
    BPE (``gpt2``) or SentencePiece (``llama``) vocabulary; returns its bytes."""
    c = common.CONFIG
    w = GGUFWriter(str(path), arch)
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(c["hidden_size"])
    w.add_block_count(1)
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(c["num_attention_heads"])
    w.add_head_count_kv(c["num_key_value_heads"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    if arch == "gemma3":
        w.add_key_length(4)
        w.add_sliding_window(8)
    w.add_tokenizer_model(tokenizer)
    if tokenizer == "gpt2":
        w.add_tokenizer_pre(pre)
        w.add_token_list(BPE)
        w.add_token_types([3] + [1] * (len(BPE) - 1))
        w.add_token_merges(["a b", "\u0120 a", "\u0120a b"])
        w.add_bos_token_id(0)
        w.add_eos_token_id(0)
    else:
        w.add_token_list(SPM)
        w.add_token_scores([0.0] * 12 + [-1.0 - i for i in range(len(SPM) - 12)])
        w.add_token_types([3, 3, 3, 2] + [6] * 8 + [1] * (len(SPM) - 12))
        w.add_bos_token_id(2)
        w.add_eos_token_id(1)
        w.add_unk_token_id(3)
        w.add_add_bos_token(True)
    tensors = common.tiny_tensors()
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    for name, t in tensors.items():
        gname = names.get(name) or f"blk.0.{BLOCK['.'.join(name.split('.')[3:-1])]}.weight"
        if arch == "gemma3" and gname.endswith(("attn_q.weight", "attn_k.weight", "attn_v.weight")):
            t = t.repeat_interleave(2, 0)  # head_dim 4 x 2 heads: as the key_length says
        if arch == "gemma3" and gname.endswith("attn_output.weight"):
            t = t.repeat_interleave(2, 1)
        a = t.numpy()
        if gname.startswith("blk.0.ffn_down"):
            w.add_tensor(gname, quants.quantize(a, GGMLQuantizationType.Q8_0), raw_dtype=GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(gname, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


def _fields(reader) -> dict:
    """key -> (value, type, item type) of a GGUF's metadata, as the writer takes them."""
    out = {}
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        sub = f.types[-1] if f.types[0] == GGUFValueType.ARRAY else None
        out[key] = (f.contents(), f.types[0], sub)
    return out


def _typed(value):
    """(value, type, item type) for a value the fuzzer chose; None when GGUF cannot hold it."""
    if isinstance(value, bool):
        return value, GGUFValueType.BOOL, None
    if isinstance(value, int):
        for lo, hi, t in ((-2**31, 2**31, GGUFValueType.INT32), (0, 2**64, GGUFValueType.UINT64),
                          (-2**63, 2**63, GGUFValueType.INT64)):
            if lo <= value < hi:
                return value, t, None
        return None
    if isinstance(value, float):
        return value, GGUFValueType.FLOAT64 if abs(value) > 3e38 else GGUFValueType.FLOAT32, None
    if isinstance(value, str):
        return value, GGUFValueType.STRING, None
    if isinstance(value, list) and value:
        first = _typed(value[0])
        if first is None or first[1] == GGUFValueType.ARRAY:
            return None
        same = [v for v in value if _typed(v) is not None and _typed(v)[1] == first[1]]
        return same, GGUFValueType.ARRAY, first[1]
    return None


def _edited(seed: dict, fdp):
    """(arch, metadata, tensors) of a seed GGUF after up to 6 edits chosen by the fuzzer."""
    arch, fields, tensors = seed["arch"], dict(seed["fields"]), list(seed["tensors"])
    for _ in range(fdp.ConsumeIntInRange(0, 6)):
        op = fdp.ConsumeIntInRange(0, 4)
        keys = sorted(fields)
        if op == 0 and keys:  # a value replaced by one of another type, perhaps
            key = keys[fdp.ConsumeIntInRange(0, len(keys) - 1)]
            typed = _typed(common._value(fdp))
            if typed is not None:
                fields[key] = typed
        elif op == 1 and keys:
            del fields[keys[fdp.ConsumeIntInRange(0, len(keys) - 1)]]
        elif op == 2:  # a key the converter reads, added
            key = EXTRA_KEYS[fdp.ConsumeIntInRange(0, len(EXTRA_KEYS) - 1)].format(a=arch)
            typed = _typed(common._value(fdp))
            if key == "general.architecture":
                arch = fdp.PickValueInList(["llama", "qwen2", "gemma3", "gemma", "falcon", ""])
            elif typed is not None:
                fields[key] = typed
        elif op == 3 and keys:  # an item of a list replaced
            key = keys[fdp.ConsumeIntInRange(0, len(keys) - 1)]
            value, kind, sub = fields[key]
            if isinstance(value, list) and value:
                value = list(value)
                value[fdp.ConsumeIntInRange(0, len(value) - 1)] = fdp.ConsumeUnicode(6) if sub == GGUFValueType.STRING \
                    else fdp.ConsumeIntInRange(-3, 300)
                fields[key] = (value, kind, sub)
        elif op == 4 and tensors:  # a tensor dropped or renamed
            i = fdp.ConsumeIntInRange(0, len(tensors) - 1)
            name, data, qtype = tensors.pop(i)
            if fdp.ConsumeBool():
                tensors.append((fdp.PickValueInList(["blk.0.attn_q.weight", "blk.1.ffn_up.weight", "blk.x.y.weight",
                                                     "token_embd.weight", "rope_freqs.weight", "output.weight"]),
                                data, qtype))
    return arch, fields, tensors


def write_edited(path, arch: str, fields: dict, tensors: list) -> bool:
    """Write a GGUF from metadata and tensors; False when the gguf writer cannot (its limits, not ours)."""
    try:
        w = GGUFWriter(str(path), arch or "x")
        for key, (value, kind, sub) in fields.items():
            w.add_key_value(key, value, kind, sub)
        for name, data, qtype in tensors:
            w.add_tensor(name, data, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return True
    except Exception:
        return False


def _seed(data: bytes) -> dict:
    path = common.SCRATCH / "seed.gguf"
    path.write_bytes(data)
    r = GGUFReader(str(path))
    return {"arch": r.fields["general.architecture"].contents(), "fields": _fields(r),
            "tensors": [(t.name, np.array(t.data), t.tensor_type) for t in r.tensors]}


SEED_FILES = [write_tiny(common.SCRATCH / f"s{i}.gguf", *spec) for i, spec in enumerate(
    [("llama", "gpt2", "smollm"), ("qwen2", "gpt2", "qwen2"), ("gemma3", "llama"), ("llama", "llama")])]
PARSED = [_seed(b) for b in SEED_FILES]  # the seed files' metadata and tensors, for edits


VALID = [b"\0" + s for s in SEED_FILES] + [b"\1" + bytes([0, i]) for i in range(len(PARSED))]
SEEDS = VALID + [b"\1", b"\1\1", b"\1\2", b"\1\3"]


def read(data: bytes) -> bool:
    """True when the input reads without error, False when it is refused with an ActTailError (or when the
    gguf writer cannot write the edited file)."""
    path = common.folder("gguf") / "model.gguf"
    if not data or data[0] % 2 == 0:
        path.write_bytes(data[1:])
    else:
        fdp = atheris.FuzzedDataProvider(data[1:])
        if not write_edited(path, *_edited(PARSED[fdp.ConsumeIntInRange(0, len(PARSED) - 1)], fdp)):
            return False
    try:
        check_architecture(path)
        reader = open_gguf(path)
        config = hf_config(reader)
        hf_tokenizer(reader)
        hf_tensors(reader, config)
        return True
    except ActTailError:
        return False


if __name__ == "__main__":
    common.main(read, SEEDS, VALID)
