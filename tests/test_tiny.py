"""The tiny checkpoints look like the real download and are deterministic."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from minicpm_server.model.tiny import SIZES, build_tiny_checkpoint, random_state_dict


def test_layout_matches_the_download(tiny_dir: Path) -> None:
    names = {p.name for p in tiny_dir.iterdir()}
    assert {
        "config.json",
        "pytorch_model.bin",
        "tokenizer.model",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "modeling_minicpm.py",
        "configuration_minicpm.py",
    } <= names
    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["model_type"] == "minicpm" and config["architectures"] == ["MiniCPMForCausalLM"]
    assert "tie_word_embeddings" not in config and "auto_map" in config
    assert {"scale_emb", "dim_model_base", "scale_depth"} <= set(config)
    state = torch.load(tiny_dir / "pytorch_model.bin", weights_only=True)
    assert "lm_head.weight" not in state and "model.embed_tokens.weight" in state
    tok_config = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    assert "<用户>" in tok_config["chat_template"] and tok_config["tokenizer_class"] == "LlamaTokenizer"


def test_tokenizer_is_shaped_like_minicpm_2b(tiny_dir: Path) -> None:
    """The facts of the real tokenizer.model that change ids: no dummy prefix, byte fallback,
    newline/tab/HTML as user-defined pieces, and the turn markers as plain text."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString((tiny_dir / "tokenizer.model").read_bytes())
    assert proto.normalizer_spec.add_dummy_prefix is False
    assert proto.normalizer_spec.remove_extra_whitespaces is False
    assert proto.trainer_spec.byte_fallback and proto.trainer_spec.model_type == pb.TrainerSpec.BPE
    user_defined = {p.piece for p in proto.pieces if p.type == pb.ModelProto.SentencePiece.USER_DEFINED}
    assert {"\n", "\t", "<p>", "</p>", "<br/>"} <= user_defined
    assert not {"<用户>", "<AI>"} & user_defined

    sp = spm.SentencePieceProcessor(model_file=str(tiny_dir / "tokenizer.model"))
    assert sp.get_piece_size() == SIZES["tiny"].vocab_size
    assert [sp.id_to_piece(i) for i in sp.encode("<用户>")] == ["<", "用户", ">"]
    assert sp.encode("hi")[0] != sp.encode(" hi")[0]  # no "▁" is put in front of the text


def test_tokenizer_json_is_lossy_like_a_transformers_conversion(tiny_dir: Path) -> None:
    """So that every test exercises the rule that tokenizer.model wins over tokenizer.json."""
    import sentencepiece as spm
    from tokenizers import Tokenizer

    sp = spm.SentencePieceProcessor(model_file=str(tiny_dir / "tokenizer.model"))
    converted = Tokenizer.from_file(str(tiny_dir / "tokenizer.json"))
    assert converted.encode("hello world", add_special_tokens=False).ids != sp.encode("hello world")


def test_parameter_counts() -> None:
    def count(size: str) -> int:
        s = SIZES[size]
        head_dim = s.hidden_size // s.num_attention_heads
        per_layer = 2 * s.hidden_size**2 + 2 * s.hidden_size * s.num_key_value_heads * head_dim
        per_layer += 3 * s.hidden_size * s.intermediate_size + 2 * s.hidden_size
        return s.vocab_size * s.hidden_size + s.num_hidden_layers * per_layer + s.hidden_size

    assert 0.5e6 < count("tiny") < 2e6
    assert 10e6 < count("medium") < 100e6
    assert abs(count("full") - 2.72e9) < 0.02e9  # MiniCPM-2B: about 2.72 B parameters


def _digest(path: Path) -> dict[str, str]:
    out = {}
    for file in sorted(path.iterdir()):
        if file.suffix == ".bin":
            state = torch.load(file, weights_only=True)
            out[file.name] = hashlib.sha256(b"".join(state[k].numpy().tobytes() for k in sorted(state))).hexdigest()
        else:
            out[file.name] = hashlib.sha256(file.read_bytes()).hexdigest()
    return out


def test_same_seed_same_checkpoint(tmp_path: Path) -> None:
    a = build_tiny_checkpoint(tmp_path / "a", "tiny", seed=7)
    b = build_tiny_checkpoint(tmp_path / "b", "tiny", seed=7)
    assert _digest(a) == _digest(b)
    other = random_state_dict(SIZES["tiny"], seed=8)
    assert not torch.equal(
        other["model.norm.weight"], torch.load(a / "pytorch_model.bin", weights_only=True)["model.norm.weight"]
    )
