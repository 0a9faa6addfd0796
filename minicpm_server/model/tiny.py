"""Build random-weight checkpoints laid out exactly like the MiniCPM-2B download.

Nothing here can fetch real weights (CI has no network), so tests, the demo mode and the CPU
benchmarks use these directories instead. They go through the same loading code as the real
model: a `minicpm` config.json with `auto_map`, MiniCPM state-dict key names with no `lm_head`,
a sentencepiece `tokenizer.model` trained at build time with `<用户>` and `<AI>` as user-defined
symbols, a `tokenizer.json`, a `tokenizer_config.json` carrying the chat template, and decoy
remote-code files that leave a marker file behind if anything ever executes them.

Everything is a pure function of (size, seed): two builds with the same arguments are byte-for-byte
identical apart from the zip timestamps inside `pytorch_model.bin`.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import random
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from minicpm_server.cache import cache_root
from minicpm_server.model.chat import MINICPM_CHAT_TEMPLATE
from minicpm_server.model.tokenizer import BUILT_HERE_MARKER
from minicpm_server.settings import Settings

# The tokenizer is trained on at most this many pieces; larger vocabularies are padded with
# unreachable filler pieces (training 122,753 real pieces would take minutes).
_TRAINED_VOCAB_CAP = 4000
EXECUTED_MARKER = "REMOTE_CODE_WAS_EXECUTED"
# Part of cached checkpoints' names: a cache built by an older tiny.py (tokenizer shaped unlike
# the real one) is not reused.
TOKENIZER_GENERATION = "-tok2"


# English words the tokenizer is trained on (tests and benchmarks build prompts from them).
COMMON_WORDS = ["the", "model", "answers", "what", "is", "mountain", "river", "city", "how", "are"]
COMMON_WORDS += ["you", "hello", "world", "code"]


@dataclass(frozen=True)
class TinySize:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int


SIZES: dict[str, TinySize] = {
    # About a million parameters: fast enough for every test.
    "tiny": TinySize(128, 4, 4, 4, 320, 2048, 1024),
    # The same with grouped KV heads, to prove the attention mapping handles GQA.
    "tiny-gqa": TinySize(128, 4, 4, 2, 320, 2048, 1024),
    # Tens of millions of parameters: the CPU benchmark model.
    "medium": TinySize(512, 8, 8, 8, 1280, 8192, 2048),
    # MiniCPM-2B's depth (40 layers) at the tiny width: a decode step is mostly per-layer overhead.
    "deep": TinySize(128, 40, 4, 4, 320, 2048, 2048),
    # The real MiniCPM-2B shape (2.72 B parameters) for GPU runs.
    "full": TinySize(2304, 40, 36, 36, 5760, 122753, 4096),
}


def minicpm_config(size: TinySize, torch_dtype: str) -> dict:
    """config.json as the MiniCPM-2B download writes it, for the given shape."""
    return {
        "_name_or_path": "openbmb/CPM-2B",
        "architectures": ["MiniCPMForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_minicpm.MiniCPMConfig",
            "AutoModel": "modeling_minicpm.MiniCPMModel",
            "AutoModelForCausalLM": "modeling_minicpm.MiniCPMForCausalLM",
            "AutoModelForSeq2SeqLM": "modeling_minicpm.MiniCPMForCausalLM",
            "AutoModelForSequenceClassification": "modeling_minicpm.MiniCPMForSequenceClassification",
        },
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": size.hidden_size,
        "initializer_range": 0.1,
        "intermediate_size": size.intermediate_size,
        "max_position_embeddings": size.max_position_embeddings,
        "model_type": "minicpm",
        "num_attention_heads": size.num_attention_heads,
        "num_hidden_layers": size.num_hidden_layers,
        "num_key_value_heads": size.num_key_value_heads,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "torch_dtype": torch_dtype,
        "transformers_version": "4.36.0",
        "use_cache": True,
        "vocab_size": size.vocab_size,
        "scale_emb": 12,
        "dim_model_base": 256,
        "scale_depth": 1.4,
    }


# --------------------------------------------------------------------------- tokenizer

# Shaped like MiniCPM-2B's real tokenizer.model: BPE with byte fallback, no dummy prefix, no
# whitespace clean-up, digits split, and a few of its 1,086 user-defined pieces (newline, tab,
# HTML tags, full-width digits and punctuation). `<用户>` and `<AI>` are plain text, as there.
USER_DEFINED_PIECES = [
    "\n",
    "\t",
    "<p>",
    "</p>",
    "<br/>",
    "<b>",
    "</b>",
    "<td>",
    "</td>",
    "```",
    *"０１２３４５６７８９",
    *"，。！？、：",
]


def _synthetic_corpus(seed: int, lines: int = 4000) -> list[str]:
    """A deterministic mix of pseudo-English words, common Chinese characters, chat turns, code and HTML.

    Only part of the Chinese range gets its own pieces; the rest is encoded through byte fallback,
    so streamed answers really do contain characters split across several tokens.
    """
    rng = random.Random(seed)
    onsets = [
        "b",
        "c",
        "d",
        "f",
        "g",
        "h",
        "j",
        "k",
        "l",
        "m",
        "n",
        "p",
        "r",
        "s",
        "t",
        "v",
        "w",
        "y",
        "z",
        "ch",
        "sh",
        "th",
    ]
    vowels = ["a", "e", "i", "o", "u", "ai", "ou", "ea"]
    words = ["".join(rng.choice(onsets) + rng.choice(vowels) for _ in range(rng.randint(1, 3))) for _ in range(3000)]
    words += COMMON_WORDS
    han = [chr(c) for c in range(0x4E00, 0x4E00 + 1500)] + list("用户你好山东省最高的是哪座它比黄还矮差距多少")
    punct = ["，", "。", "？", ", ", ". ", "? ", "\n"]

    def sentence() -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(5, 16))) + rng.choice(punct)

    def chinese() -> str:
        return "".join(rng.choice(han) for _ in range(rng.randint(8, 30))) + rng.choice(punct)

    out = []
    for i in range(lines):
        kind = i % 6
        if kind in (0, 1):
            out.append(chinese())
        elif kind == 2:
            out.append(f"<用户>{chinese()}<AI>{sentence()}")
        elif kind == 3:
            out.append(f"def {rng.choice(words)}(x):\n    return x  # {sentence()}\n\tdone")
        elif kind == 4:
            out.append(f"<p>{sentence()}</p><br/>  <b>{rng.choice(words)}</b>")
        else:
            out.append(sentence())
    return out


def _train_sentencepiece(vocab_size: int, seed: int) -> bytes:
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_synthetic_corpus(seed)),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        user_defined_symbols=USER_DEFINED_PIECES,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        character_coverage=0.98,
        num_threads=1,  # more threads make training order, and so the vocabulary, nondeterministic
        minloglevel=2,
    )
    return model.getvalue()


def _filler_pieces(start: int, stop: int) -> list[str]:
    # Digits never occur in the training corpus, so these never collide with trained pieces.
    return [f"▁x{i:06d}" for i in range(start, stop)]


def _pad_sentencepiece(model_bytes: bytes, vocab_size: int) -> bytes:
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(model_bytes)
    lowest = min(p.score for p in proto.pieces)
    for i, piece in enumerate(_filler_pieces(len(proto.pieces), vocab_size)):
        proto.pieces.add(piece=piece, score=lowest - 1 - i, type=pb.ModelProto.SentencePiece.NORMAL)
    return proto.SerializeToString()


def _tokenizer_json(spm_dir: Path, vocab_size: int) -> dict:
    """tokenizer.json as a transformers conversion writes it, padded, with a BOS post-processor.

    transformers' LlamaTokenizer, converting with its defaults, puts "▁" in front of the text and
    after user-defined pieces: lossy in the same way as the real download's tokenizer.json, so
    every test exercises the rule that tokenizer.model wins. The converter adds no BOS; the real
    download's tokenizer.json does (the chat template leaves BOS to the tokenizer), so we add it.
    """
    from transformers import LlamaTokenizer

    with tempfile.TemporaryDirectory() as out:
        LlamaTokenizer.from_pretrained(str(spm_dir)).save_pretrained(out)
        data = json.loads((Path(out) / "tokenizer.json").read_text(encoding="utf-8"))
    vocab: dict[str, int] = data["model"]["vocab"]
    for piece in _filler_pieces(len(vocab), vocab_size):
        vocab[piece] = len(vocab)
    data["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [
            {"SpecialToken": {"id": "<s>", "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
            {"SpecialToken": {"id": "<s>", "type_id": 1}},
            {"Sequence": {"id": "B", "type_id": 1}},
        ],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}},
    }
    return data


def _tokenizer_config() -> dict:
    special = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {
            "0": {"content": "<unk>", **special},
            "1": {"content": "<s>", **special},
            "2": {"content": "</s>", **special},
        },
        "bos_token": "<s>",
        "chat_template": MINICPM_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "legacy": True,
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": None,
        "sp_model_kwargs": {},
        "spaces_between_special_tokens": False,
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }


def write_tokenizer(
    path: Path, vocab_size: int, seed: int, *, from_dir: Path | None = None, lossy_json: bool = True
) -> int:
    """Write the tokenizer files; returns the vocabulary size the model must have.

    `from_dir` takes a real `tokenizer.model` (MiniCPM-2B's own) instead of training one; then the
    vocabulary is that model's size. `lossy_json` False leaves tokenizer.json out.
    """
    if from_dir is not None:
        model_bytes = (Path(from_dir) / "tokenizer.model").read_bytes()
    else:
        model_bytes = _pad_sentencepiece(_train_sentencepiece(min(vocab_size, _TRAINED_VOCAB_CAP), seed), vocab_size)
    (path / "tokenizer.model").write_bytes(model_bytes)
    _write_json(path / "tokenizer_config.json", _tokenizer_config())
    _write_json(path / "special_tokens_map.json", {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
    pieces = _piece_count(model_bytes)
    if lossy_json:
        with tempfile.TemporaryDirectory() as spm_dir:
            (Path(spm_dir) / "tokenizer.model").write_bytes(model_bytes)
            _write_json(Path(spm_dir) / "tokenizer_config.json", _tokenizer_config())
            _write_json(path / "tokenizer.json", _tokenizer_json(Path(spm_dir), pieces))
    return pieces


def _piece_count(model_bytes: bytes) -> int:
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(model_bytes)
    return len(proto.pieces)


# --------------------------------------------------------------------------- weights


def random_state_dict(size: TinySize, seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random weights under MiniCPM's key names; no lm_head (it is tied to the embeddings)."""
    gen = torch.Generator().manual_seed(seed)
    head_dim = size.hidden_size // size.num_attention_heads
    kv_dim = size.num_key_value_heads * head_dim
    h, i = size.hidden_size, size.intermediate_size

    def normal(rows: int, cols: int, std: float | None = None) -> torch.Tensor:
        # Layer matrices get std 2/sqrt(fan_in) so the layers, not 12x the input embedding,
        # dominate the residual stream. With tied embeddings and small weights a random model
        # repeats its last input token (every chat answer would be cut at `<AI>`), and greedy
        # decoding falls into a one-token loop; at this scale greedy text varies token to token.
        std = 2.0 * cols**-0.5 if std is None else std
        return torch.empty(rows, cols).normal_(0.0, std, generator=gen).to(dtype)

    def norm_weight() -> torch.Tensor:
        return (1.0 + torch.empty(h).normal_(0.0, 0.05, generator=gen)).to(dtype)

    state = {"model.embed_tokens.weight": normal(size.vocab_size, h, std=0.02)}
    for n in range(size.num_hidden_layers):
        p = f"model.layers.{n}."
        state[p + "self_attn.q_proj.weight"] = normal(h, h)
        state[p + "self_attn.k_proj.weight"] = normal(kv_dim, h)
        state[p + "self_attn.v_proj.weight"] = normal(kv_dim, h)
        state[p + "self_attn.o_proj.weight"] = normal(h, h)
        state[p + "mlp.gate_proj.weight"] = normal(i, h)
        state[p + "mlp.up_proj.weight"] = normal(i, h)
        state[p + "mlp.down_proj.weight"] = normal(h, i)
        state[p + "input_layernorm.weight"] = norm_weight()
        state[p + "post_attention_layernorm.weight"] = norm_weight()
    state["model.norm.weight"] = norm_weight()
    return state


def _split_shards(state: dict[str, torch.Tensor], shards: int) -> list[dict[str, torch.Tensor]]:
    keys = list(state)
    per = math.ceil(len(keys) / shards)
    return [{k: state[k] for k in keys[j : j + per]} for j in range(0, len(keys), per)]


def write_weights(path: Path, state: dict[str, torch.Tensor], fmt: str, shards: int) -> None:
    """Write weights as the hub does: one file, or numbered shards with an index json."""
    ext = "bin" if fmt == "bin" else "safetensors"
    stem = "pytorch_model" if fmt == "bin" else "model"
    parts = _split_shards(state, shards) if shards > 1 else [state]
    weight_map: dict[str, str] = {}
    for j, part in enumerate(parts, start=1):
        name = f"{stem}.{ext}" if len(parts) == 1 else f"{stem}-{j:05d}-of-{len(parts):05d}.{ext}"
        _save_tensors(path / name, part, fmt)
        weight_map.update(dict.fromkeys(part, name))
    if len(parts) > 1:
        total = sum(t.numel() * t.element_size() for t in state.values())
        _write_json(path / f"{stem}.{ext}.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


def _save_tensors(file: Path, tensors: dict[str, torch.Tensor], fmt: str) -> None:
    if fmt == "bin":
        torch.save(tensors, file)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in tensors.items()}, str(file), metadata={"format": "pt"})


# --------------------------------------------------------------------------- the directory

_DECOY_CODE = '''"""Stand-in for the download's remote code. Executing it is a security bug in the server."""
from pathlib import Path

Path(__file__).with_name("{marker}").write_text("executed")
raise RuntimeError("the checkpoint's remote code was executed")
'''


def build_tiny_checkpoint(
    path: str | Path,
    size: str | TinySize = "tiny",
    seed: int = 0,
    *,
    dtype: torch.dtype = torch.float32,
    weights_format: str = "bin",
    shards: int = 1,
    tokenizer_from: str | Path | None = None,
    tokenizer_json: bool = True,
    **overrides: int,
) -> Path:
    """Write a random-weight MiniCPM checkpoint directory and return its path.

    `size` is a key of SIZES or a TinySize; keyword overrides replace single fields of it
    (e.g. `max_position_embeddings=256`). `weights_format` is "bin" (pickle, as the real
    download) or "safetensors"; `shards` > 1 writes numbered shards with an index file.
    `tokenizer_from` is a directory holding a real `tokenizer.model` (MiniCPM-2B's, 122,753
    pieces) to use instead of a trained one; the vocabulary then follows it. `tokenizer_json`
    False leaves out the (deliberately lossy) tokenizer.json.
    """
    shape = SIZES[size] if isinstance(size, str) else size
    shape = replace(shape, **overrides) if overrides else shape
    if weights_format not in ("bin", "safetensors"):
        raise ValueError(f"weights_format must be 'bin' or 'safetensors', not {weights_format!r}")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    from_dir = Path(tokenizer_from) if tokenizer_from is not None else None
    vocab = write_tokenizer(out, shape.vocab_size, seed, from_dir=from_dir, lossy_json=tokenizer_json)
    shape = replace(shape, vocab_size=vocab)
    dtype_name = str(dtype).removeprefix("torch.")
    _write_json(out / "config.json", minicpm_config(shape, dtype_name))
    _write_json(
        out / "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2, "transformers_version": "4.36.0"}
    )
    write_weights(out, random_state_dict(shape, seed, dtype), weights_format, shards)
    for name in ("modeling_minicpm.py", "configuration_minicpm.py"):
        (out / name).write_text(_DECOY_CODE.format(marker=EXECUTED_MARKER), encoding="utf-8")
    mark_built_here(out)
    return out


def mark_built_here(out: Path) -> None:
    """Say that this checkpoint is ours (model/tokenizer.py then keeps quiet about its tokenizer.json)."""
    (out / BUILT_HERE_MARKER).write_text("random weights, built by minicpm_server.model.tiny\n", encoding="utf-8")


def cached_tiny_checkpoint(
    cache_root: str | Path, size: str = "tiny", seed: int = 0, tokenizer_from: str | Path | None = None
) -> Path:
    """Build once under cache_root and reuse; a half-written build is never reused."""
    tag = "-real-tokenizer" if tokenizer_from is not None else ""
    target = Path(cache_root) / f"minicpm-{size}-seed{seed}{TOKENIZER_GENERATION}{tag}"
    if (target / ".complete").exists():
        if not (target / BUILT_HERE_MARKER).exists():
            mark_built_here(target)  # built by a version that did not mark its checkpoints
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    build_tiny_checkpoint(staging, size, seed, tokenizer_from=tokenizer_from)
    (staging / ".complete").write_text("ok")
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)
    return target


def demo_cache_dir() -> Path:
    return cache_root()


def _real_tokenizer_dir() -> Path | None:
    """MINICPM_REAL_TOKENIZER: a directory with MiniCPM-2B's own tokenizer.model for the demo model."""
    found = os.environ.get("MINICPM_REAL_TOKENIZER")
    return Path(found) if found and (Path(found) / "tokenizer.model").is_file() else None


def demo_settings(settings: Settings) -> Settings:
    """--demo: the tiny random-weight checkpoint (built once, cached), on CPU in float32 unless
    --device/--dtype say otherwise. Settings without --demo come back unchanged."""
    if not settings.demo:
        return settings
    path = cached_tiny_checkpoint(demo_cache_dir(), "tiny", seed=0, tokenizer_from=_real_tokenizer_dir())
    device = "cpu" if settings.device == "auto" else settings.device
    dtype = "float32" if settings.dtype == "auto" else settings.dtype
    return settings.model_copy(
        update={"model_path": path, "device": device, "dtype": dtype, "served_model_name": "minicpm-demo"}
    )


def _write_json(file: Path, data: dict) -> None:
    file.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build a random-weight MiniCPM-format checkpoint.")
    parser.add_argument("path")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--format", choices=["bin", "safetensors"], default="bin")
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument("--tokenizer-from", help="directory with a real tokenizer.model to use (MiniCPM-2B's)")
    args = parser.parse_args(argv)
    out = build_tiny_checkpoint(
        args.path,
        args.size,
        args.seed,
        dtype=getattr(torch, args.dtype),
        weights_format=args.format,
        shards=args.shards,
        tokenizer_from=args.tokenizer_from,
    )
    print(out)


if __name__ == "__main__":
    main()
