"""Tiny GGUF files for the converter tests.

Well-formed files are written with the ``gguf`` package's own ``GGUFWriter`` from a random
Hugging Face-layout model, with the q/k rows permuted the way llama.cpp's converter does, so a
round trip checks our reader against an independent writer. The ``gguf`` package quantizes
Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 itself; the K-quants it only dequantizes, so :func:`quantize_k`
builds those blocks here (simple quantizers, not llama.cpp's search for the best scales) and
the expected values always come from ``gguf.quants.dequantize`` of the bytes written. Hostile
files are assembled byte by byte with :func:`raw_gguf`.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as V
from tiny import CHATML, random_weights, tiny_config, tiny_tokenizer_json
from tokenizers import Tokenizer

# Hugging Face name pieces -> GGUF name pieces (written out independently of the converter).
HF_TO_GGUF_BLOCK = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.bias": "attn_output.bias",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
HF_TO_GGUF_GLOBAL = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def to_gguf_name(hf: str) -> str:
    if hf in HF_TO_GGUF_GLOBAL:
        return HF_TO_GGUF_GLOBAL[hf]
    _, _, layer, rest = hf.split(".", 3)
    return f"blk.{layer}.{HF_TO_GGUF_BLOCK[rest]}"


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """The row permutation llama.cpp's HF->GGUF converter applies to q/k (weights and biases)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tokenizer_parts(tokenizer_json: str | None = None) -> tuple[list[str], list[int], list[str]]:
    """(tokens by id, llama.cpp token types, "a b" merges) of a byte-level BPE tokenizer.json."""
    data = json.loads(tokenizer_json or tiny_tokenizer_json())
    vocab = data["model"]["vocab"]
    tokens = [""] * len(vocab)
    for text, i in vocab.items():
        tokens[i] = text
    assert all(tokens), "token ids must be contiguous"
    specials = {t["content"] for t in data["added_tokens"] if t["special"]}
    types = [3 if t in specials else 1 for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    return tokens, types, merges


def tiny_tokenizer() -> Tokenizer:
    return Tokenizer.from_str(tiny_tokenizer_json())


# --- K-quant blocks (256 values per super-block) -----------------------------------------------

K_TYPES = (Q.Q4_K, Q.Q5_K, Q.Q6_K)


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype("<f2").reshape(-1, 1).view(np.uint8)


def _pack_k_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins -> ggml's 12 bytes: bytes 0-3 scale j (low 6 bits) with
    the top 2 bits of scale j+4 above; bytes 4-7 the same for the mins; bytes 8-11 the low
    nibbles of scale j+4 (low) and min j+4 (high)."""
    sc, mn = sc.astype(np.uint8), mn.astype(np.uint8)
    out = np.empty((sc.shape[0], 12), np.uint8)
    out[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    return out


def _q4_k_bytes(q: np.ndarray) -> np.ndarray:
    """256 4-bit codes -> 128 bytes: byte 32i+l holds value l of sub-block 2i (low nibble)
    and of sub-block 2i+1 (high nibble)."""
    q = q.reshape(-1, 4, 2, 32).astype(np.uint8)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)


def quantize_k(w: np.ndarray, qtype: Q) -> np.ndarray:
    """``w[rows, cols]`` (cols a multiple of 256) as Q4_K, Q5_K or Q6_K bytes ``[rows, ...]``."""
    rows, cols = w.shape
    x = w.reshape(-1, 256).astype(np.float32)
    if qtype == Q.Q6_K:
        sub = x.reshape(-1, 16, 16)
        a = np.abs(sub).max(axis=-1) / 31  # per-16 scale so that |x| / a <= 31
        d = (a.max(axis=-1) / 127).astype(np.float16).astype(np.float32)
        sc = np.rint(a / np.where(d == 0, 1, d)[:, None]).clip(-128, 127).astype(np.int8)
        step = d[:, None] * sc
        q = np.rint(sub / np.where(step == 0, 1, step)[..., None]) + 32
        q = q.clip(0, 63).astype(np.uint8).reshape(-1, 2, 4, 32)  # [n, half, run, l]
        ql = (q[:, :, 0:2] & 0x0F) | ((q[:, :, 2:4] & 0x0F) << 4)  # runs t and t+2 share bytes
        qh = (q >> 4)
        qh = qh[:, :, 0] | (qh[:, :, 1] << 2) | (qh[:, :, 2] << 4) | (qh[:, :, 3] << 6)
        blocks = np.concatenate(
            [ql.reshape(-1, 128), qh.reshape(-1, 64), sc.view(np.uint8), _f16_bytes(d)], axis=1
        )
        return blocks.reshape(rows, -1)
    levels = 15 if qtype == Q.Q4_K else 31
    sub = x.reshape(-1, 8, 32)
    lo = np.minimum(sub.min(axis=-1), 0)
    scale = (sub.max(axis=-1) - lo) / levels
    d = (scale.max(axis=-1) / 63).astype(np.float16).astype(np.float32)
    dmin = ((-lo).max(axis=-1) / 63).astype(np.float16).astype(np.float32)
    sc = np.rint(scale / np.where(d == 0, 1, d)[:, None]).clip(0, 63)
    mn = np.rint(-lo / np.where(dmin == 0, 1, dmin)[:, None]).clip(0, 63)
    step = d[:, None] * sc
    q = np.rint((sub + (dmin[:, None] * mn)[..., None]) / np.where(step == 0, 1, step)[..., None])
    q = q.clip(0, levels).astype(np.uint8)
    head = [_f16_bytes(d), _f16_bytes(dmin), _pack_k_scales(sc, mn)]
    if qtype == Q.Q4_K:
        blocks = np.concatenate([*head, _q4_k_bytes(q)], axis=1)
    else:
        high = (q >> 4).reshape(-1, 8, 32)  # bit 4 of value l of sub-block j -> qh[l] bit j
        qh = np.bitwise_or.reduce(high << np.arange(8, dtype=np.uint8)[None, :, None], axis=1)
        blocks = np.concatenate([*head, qh, _q4_k_bytes(q & 0x0F)], axis=1)
    return blocks.reshape(rows, -1)


def quantize_bytes(w: np.ndarray, qtype: Q) -> np.ndarray:
    """``w`` stored as ``qtype``: gguf's own quantizer, or :func:`quantize_k` for K-quants."""
    return quantize_k(w, qtype) if qtype in K_TYPES else gguf.quants.quantize(w, qtype)


def write_gguf(
    path: Path,
    config: dict | None = None,
    weights: dict[str, np.ndarray] | None = None,
    *,
    qtype: Q = Q.F32,
    arch: str = "llama",
    pre: str = "default",
    permute: bool | None = None,
    skip: tuple[str, ...] = (),
    overrides: dict[str, Q] | None = None,
    extra_tensors: dict[str, np.ndarray] | None = None,
    rope_freqs: np.ndarray | None = None,
    metadata: dict | None = None,
) -> Path:
    """Write ``weights`` (Hugging Face names and layout) as a llama.cpp-style GGUF file.

    2-D tensors are stored as ``qtype`` (``overrides`` per GGUF name), 1-D ones as F32, like
    llama.cpp does. ``skip`` leaves GGUF tensors out; ``metadata`` adds, replaces or (with
    None) deletes keys.
    """
    config = dict(config or tiny_config())
    weights = dict(weights or random_weights(config))
    if permute is None:
        permute = arch == "llama"
    nh, nkv = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    hd = config.get("head_dim", config["hidden_size"] // nh)
    tokens, types, merges = tokenizer_parts()
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(config["num_hidden_layers"])
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(nh)
    w.add_head_count_kv(nkv)
    w.add_rope_freq_base(config["rope_theta"])
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_rope_dimension_count(hd)
    w.add_vocab_size(config["vocab_size"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)
    for key, value in (metadata or {}).items():
        if key in w.kv_data[0]:
            del w.kv_data[0][key]
        if value is None:  # just delete the key
            continue
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_array(key, value)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    for hf, arr in {**weights, **(extra_tensors or {})}.items():
        name = to_gguf_name(hf) if hf in weights else hf
        if name in skip:
            continue
        arr = np.asarray(arr, dtype=np.float32)
        if permute and (".q_proj." in hf or ".k_proj." in hf):
            arr = llama_cpp_permute(arr, nh if ".q_proj." in hf else nkv)
        t = (overrides or {}).get(name, qtype if arr.ndim == 2 else Q.F32)
        if t == Q.F32:
            w.add_tensor(name, np.ascontiguousarray(arr))
        elif t == Q.F16:
            w.add_tensor(name, arr.astype(np.float16))
        else:
            w.add_tensor(name, quantize_bytes(arr, t), raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def gguf_roundtrip_expected(arr: np.ndarray, qtype: Q) -> np.ndarray:
    """What a tensor stored as ``qtype`` reads back as (gguf's own quantize + dequantize)."""
    if qtype == Q.F32:
        return arr
    if qtype == Q.F16:
        return arr.astype(np.float16).astype(np.float32)
    return gguf.quants.dequantize(quantize_bytes(arr, qtype), qtype)


# --- hand-made headers ----------------------------------------------------------------------


def gstr(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def kv_str(key: str, value: str) -> bytes:
    return gstr(key) + struct.pack("<I", V.STRING) + gstr(value)


def kv_u32(key: str, value: int) -> bytes:
    return gstr(key) + struct.pack("<II", V.UINT32, value)


def tensor_info(name: str, dims: tuple[int, ...], qtype: int, offset: int) -> bytes:
    return (
        gstr(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
        + struct.pack("<IQ", qtype, offset)
    )


def raw_gguf(
    kvs: list[bytes], tensors: list[bytes], data: bytes = b"", *, version: int = 3,
    n_kv: int | None = None, n_tensors: int | None = None, magic: bytes = b"GGUF",
) -> bytes:
    """A GGUF byte string; counts default to the real ones but can lie."""
    head = magic + struct.pack(
        "<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
        len(kvs) if n_kv is None else n_kv,
    )
    body = head + b"".join(kvs) + b"".join(tensors)
    body += b"\0" * (-len(body) % 32)
    return body + data
