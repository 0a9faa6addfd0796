"""How far bf16 and int8 move next-token distributions from float32: ours, and llama.cpp's own.

    python -m bench.accuracy                       # medium checkpoint; ours: float32, bf16, int8, int8-head
    python -m bench.accuracy --llama               # and llama-server on F32, BF16 and Q8_0 GGUFs of it
    python -m bench.accuracy --model-path DIR --variants float32,int8
    python -m bench.accuracy --variants float32,int8,int8-g32,int4-g128,int4-g32   # is 4-bit worth it? (simulated)

The contexts are tests/data/accuracy_contexts.txt, tokenized by the checkpoint's tokenizer (BOS
first), cut to `--max-tokens`; next-token distributions are taken after every `--every`-th token
from the `--first`-th on. Each variant is compared with the float32 run *of the same engine*
(ours with ours, llama.cpp's quantized GGUFs with its F32 GGUF), by:

* top-1 agreement: the share of positions where both pick the same most likely token;
* mean KL(float32 || variant) of the full next-token distributions, in nats.

And the two float32 runs with each other, which checks that the engines compute the same model.

Ours: transformers' forward (the prefill path, on the same int8/bf16 layers the decode step
uses) over each whole context. llama-server: one `/completion` per position, prompt = the
context's ids up to it, `n_probs` = the vocabulary size with `post_sampling_probs` off, which
returns the softmax of the raw logits over every token (the slot's cached prompt makes each
position cost one token).

Random weights (every checkpoint here) give near-flat distributions: the top-1 token often wins
by a hair, so top-1 agreement is much lower than it would be on a trained model, where the top
token usually leads by a wide margin; KL is the steadier measure. Both engines see the same
weights, so the comparison between them stands.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import requests
import torch

from bench.compare import wait_healthy
from bench.peers import CACHE, ensure_llama_built, gguf_for, llama_server, port_free, start_server, stop_server
from minicpm_server.engine.native.quantized import quantize_model, table_in, weights_in
from minicpm_server.model.checkpoint import load_checkpoint
from minicpm_server.model.tiny import cached_tiny_checkpoint
from minicpm_server.model.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parent.parent
CONTEXTS = REPO / "tests" / "data" / "accuracy_contexts.txt"
OURS = {  # variant: (dtype, quantization, quantize the output head)
    "float32": ("float32", None, False),
    "bf16": ("bfloat16", None, False),  # bfloat16 throughout (PyTorch's forward)
    "bf16-weights": ("float32", None, False),  # what --dtype bfloat16 serves on CPU with our kernels
    "int8": ("float32", "int8", False),  # what --quantization int8 runs: the head (the tied table) in bf16 on CPU
    "int8-f32-head": ("float32", "int8", False),  # the head (the tied table) left in float32
    "int8-head": ("float32", "int8", True),  # --quantize-head: the head (and tied embedding) in int8 too
}
# Formats no kernel of ours runs yet, simulated: each weight matrix (head and embedding included)
# replaced by its rounded values, computed in float32. (bits, group of inputs sharing a scale,
# symmetric): "int8-g32" is Q8_0's rounding; "int4-g128" the group-wise 4-bit layout of
# PyTorch's int4 kernel (bench/quant_kernels.py); "int4-g32" Q4_0's block size.
SIMULATED = {"int8-g32": (8, 32, True), "int4-g128": (4, 128, False), "int4-g32": (4, 32, True)}
LLAMA = {"F32": "f32", "BF16": "bf16", "Q8_0": "q8_0"}  # variant: convert_hf_to_gguf.py --outtype


@dataclass(frozen=True)
class Position:
    context: list[int]  # the whole context's ids
    length: int  # the next token is predicted after context[:length]


def positions(model: Path, first: int, every: int, max_tokens: int) -> list[Position]:
    tokenizer = load_tokenizer(model)
    out = []
    for line in CONTEXTS.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        ids = tokenizer.encode(line.replace("\\n", "\n"))[:max_tokens]
        out += [Position(ids, n) for n in range(first, len(ids) + 1, every)]
    return out


def by_context(points: list[Position]) -> Iterator[tuple[list[int], list[int]]]:
    """(context ids, indexes into `points`) for each distinct context, in order."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, point in enumerate(points):
        groups.setdefault(tuple(point.context), []).append(index)
    for context, indexes in groups.items():
        yield list(context), indexes


def fake_quantized(weight: torch.Tensor, bits: int, group: int, symmetric: bool) -> torch.Tensor:
    """`weight` rounded to `bits` with one scale (and, asymmetric, one offset) per `group` inputs."""
    rows, columns = weight.shape
    grouped = weight.float().reshape(rows, columns // group, group)
    if symmetric:
        top = 2 ** (bits - 1) - 1
        scale = grouped.abs().amax(-1, keepdim=True).clamp(min=1e-10) / top
        return (torch.round(grouped / scale).clamp(-top, top) * scale).reshape(rows, columns)
    low, high = grouped.amin(-1, keepdim=True), grouped.amax(-1, keepdim=True)
    scale = (high - low).clamp(min=1e-10) / (2**bits - 1)
    return (torch.round((grouped - low) / scale).clamp(0, 2**bits - 1) * scale + low).reshape(rows, columns)


def simulate(model, variant: str) -> None:
    bits, group, symmetric = SIMULATED[variant]
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):  # the tied head is the embedding table too
                module.weight.copy_(fake_quantized(module.weight, bits, group, symmetric))


def ours(model_path: Path, variant: str, points: list[Position]) -> torch.Tensor:
    """Log-probabilities [positions, vocab] (float64) from our model in `variant`."""
    dtype, method, head = OURS.get(variant, ("float32", None, False))
    model = load_checkpoint(model_path, device="cpu", dtype=dtype).model
    if variant in SIMULATED:
        simulate(model, variant)
    if method:
        quantize_model(model, method, head=head)
    if variant == "bf16-weights":
        weights_in(model, torch.bfloat16)
    if variant == "int8" and not table_in(model, torch.bfloat16):
        raise SystemExit("the int8 variant keeps its table in bfloat16 through our CPU kernels, unavailable here")
    out = torch.empty(len(points), model.config.vocab_size, dtype=torch.float64)
    with torch.inference_mode():
        for context, indexes in by_context(points):
            logits = model(input_ids=torch.tensor([context])).logits[0].double()
            for i in indexes:
                out[i] = torch.log_softmax(logits[points[i].length - 1], -1)
    return out


def llama(model_path: Path, variant: str, points: list[Position], vocab: int, port: int) -> torch.Tensor:
    """The same from llama-server on a GGUF of the checkpoint in `variant`."""
    ensure_llama_built()
    longest = max(len(p.context) for p in points)
    server = llama_server("llama", gguf_for(model_path, LLAMA[variant]), 1, longest + 64, port)
    log_file = Path(tempfile.mkdtemp(prefix="minicpm-accuracy-")) / f"llama-{variant}.log"
    proc = start_server(server, log_file)
    url = f"http://127.0.0.1:{port}"
    out = torch.full((len(points), vocab), -math.inf, dtype=torch.float64)
    banned = byte_tokens(model_path)
    try:
        wait_healthy(url, proc, timeout=1200)
        with requests.Session() as session:
            for i, point in enumerate(points):
                out[i] = llama_log_probs(session, url, point.context[: point.length], vocab, banned)
    finally:
        stop_server(proc)
    return out


def byte_tokens(model_path: Path) -> list[int]:
    """Ids of the single-byte pieces ("<0xE4>"): see llama_log_probs."""
    pieces, _ = load_tokenizer(model_path).grammar_vocabulary()
    return [i for i, piece in enumerate(pieces) if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">")]


def llama_log_probs(
    session: requests.Session, url: str, prompt: list[int], vocab: int, banned: list[int]
) -> torch.Tensor:
    """One position's log-probabilities. llama-server withholds a token that ends inside a UTF-8
    character, and its probabilities with it, so the one token generated here may not be a
    single byte: `logit_bias` bans those from being *picked*, and the probabilities it reports are
    still those of the raw logits (checked: a banned token keeps its own log-probability)."""
    body = {
        "logit_bias": [[token, False] for token in banned],
        "prompt": prompt,
        "n_predict": 1,
        "n_probs": vocab,
        "post_sampling_probs": False,
        "cache_prompt": True,
        "temperature": 0,
        "ignore_eos": True,  # when EOS is the likeliest next token, its probabilities are still reported
    }
    r = session.post(url + "/completion", json=body, timeout=600)
    r.raise_for_status()
    answer = r.json()
    if not answer.get("completion_probabilities"):
        shown = {k: v for k, v in answer.items() if k not in ("generation_settings", "prompt")}
        raise RuntimeError(f"llama-server returned no probabilities for a {len(prompt)}-token prompt: {shown}")
    entry = answer["completion_probabilities"][0]
    row = torch.full((vocab,), -math.inf, dtype=torch.float64)
    for item in entry.get("top_logprobs") or entry.get("top_probs") or []:
        value = item["logprob"] if "logprob" in item else math.log(max(item["prob"], 1e-300))
        row[item["id"]] = value
    if not torch.isfinite(row).all():
        raise RuntimeError(f"llama-server returned {int(torch.isfinite(row).sum())} of {vocab} probabilities")
    return row


def compare(reference: torch.Tensor, other: torch.Tensor) -> dict[str, float]:
    agree = (reference.argmax(-1) == other.argmax(-1)).double().mean()
    kl = (reference.exp() * (reference - other)).sum(-1)
    return {"top-1 agreement": float(agree), "mean KL (nats)": float(kl.mean()), "max KL (nats)": float(kl.max())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="medium")
    parser.add_argument("--model-path", type=Path, help="an existing checkpoint instead of a built one")
    parser.add_argument(
        "--variants",
        default=",".join(OURS),
        help=f"ours, from {','.join([*OURS, *SIMULATED])} (simulated: see SIMULATED)",
    )
    parser.add_argument("--llama", action="store_true", help="also llama-server on F32, BF16 and Q8_0 GGUFs")
    parser.add_argument("--first", type=int, default=4)
    parser.add_argument("--every", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=40)
    parser.add_argument("--port", type=int, default=6351)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    model = args.model_path or cached_tiny_checkpoint(CACHE, args.size, seed=0)
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    points = positions(model, args.first, args.every, args.max_tokens)
    print(f"checkpoint {model}; {len(points)} positions in {len(list(by_context(points)))} contexts; vocab {vocab}")
    runs: dict[str, torch.Tensor] = {}
    for variant in args.variants.split(","):
        start = time.perf_counter()
        runs[f"ours {variant}"] = ours(model, variant, points)
        print(f"  ours {variant}: {time.perf_counter() - start:.0f} s", flush=True)
    if args.llama:
        for variant in LLAMA:
            while not port_free(args.port):
                args.port += 1
            start = time.perf_counter()
            runs[f"llama {variant}"] = llama(model, variant, points, vocab, args.port)
            print(f"  llama {variant}: {time.perf_counter() - start:.0f} s", flush=True)
    rows = {}
    for name in runs:
        engine = name.split()[0]
        reference = "ours float32" if engine == "ours" else "llama F32"
        if name != reference and reference in runs:
            rows[f"{name} vs {reference}"] = compare(runs[reference], runs[name])
    if "ours float32" in runs and "llama F32" in runs:
        rows["llama F32 vs ours float32 (same model?)"] = compare(runs["ours float32"], runs["llama F32"])
    print("\n| comparison | top-1 agreement | mean KL (nats) | max KL (nats) |\n| --- | --- | --- | --- |")
    for name, row in rows.items():
        print(f"| {name} | {row['top-1 agreement']:.3f} | {row['mean KL (nats)']:.2e} | {row['max KL (nats)']:.2e} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
