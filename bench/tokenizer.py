"""Tokenizer speed: our sentencepiece tokenizer vs transformers' tokenizers, one run, as ratios.

    python -m bench.tokenizer --tokenizer-dir DIR     # DIR holds MiniCPM-2B's tokenizer.model

"before" is what the server used until it followed sentencepiece: transformers'
PreTrainedTokenizerFast on the checkpoint's tokenizer.json (here one converted by transformers, as
the download's was). Encoding is measured on a long mixed Chinese/English/code text; decoding on
the short windows the streaming detokenizer decodes once per generated token.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from minicpm_server.engine.detokenize import IncrementalDetokenizer
from minicpm_server.model.tiny import write_tokenizer
from minicpm_server.model.tokenizer import load_tokenizer

TEXT = (
    "山东省最高的山是哪座山, 它比黄山高还是矮？差距多少？泰山位于山东省泰安市，主峰玉皇顶海拔1545米。\n"
    "MiniCPM is an end-side LLM developed by ModelBest Inc. and TsinghuaNLP.\n"
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n"
    "<p>Hello</p><br/> 😀 ０１２３ 【注意】\n"
) * 200


class TransformersAdapter:
    """transformers' fast tokenizer behind the same two calls the server makes."""

    def __init__(self, directory: Path) -> None:
        from transformers import PreTrainedTokenizerFast

        self._tok = PreTrainedTokenizerFast.from_pretrained(str(directory))

    def encode(self, text: str) -> list[int]:
        return self._tok(text).input_ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


def rate(work, units: int, repeats: int = 5) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - start)
    return units / best


def measure(tokenizer, ids: list[int]) -> tuple[float, float]:
    encode = rate(lambda: tokenizer.encode(TEXT), len(ids))

    def stream() -> None:
        detok = IncrementalDetokenizer(tokenizer)
        for token in ids[:4000]:
            detok.push(token)
        detok.flush()

    return encode, rate(stream, min(len(ids), 4000))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer-dir", required=True, help="directory with MiniCPM-2B's tokenizer.model")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        write_tokenizer(directory, 0, 0, from_dir=Path(args.tokenizer_dir))  # + a converted tokenizer.json
        ours = load_tokenizer(directory)
        before = TransformersAdapter(directory)
        ids = ours.encode(TEXT)[1:]
        ours_enc, ours_dec = measure(ours, ids)
        before_enc, before_dec = measure(before, ids)
    print(f"text: {len(TEXT)} characters, {len(ids)} tokens")
    print(
        f"encode  tokens/s: sentencepiece {ours_enc:,.0f}  transformers {before_enc:,.0f}  ratio {ours_enc / before_enc:.2f}x"
    )
    print(
        f"stream  tokens/s: sentencepiece {ours_dec:,.0f}  transformers {before_dec:,.0f}  ratio {ours_dec / before_dec:.2f}x"
    )


if __name__ == "__main__":
    main()
