"""KV memory held per token needed: the left-padded batch of before vs the paged blocks of now.

    python -m bench.padding

No model runs: the block pool (engine/native/blocks.py) reserves for each mix exactly as the
engine does, and the left-padded figure is what one [batch, time] cache as long as its longest
row holds. Each request needs its prompt plus its max_tokens.
"""

from __future__ import annotations

from minicpm_server.engine.native.blocks import BlockPool

MIXES = {
    "one 2,000-token prompt beside fifteen of 50 (max_tokens 48)": [(2000, 48)] + [(50, 48)] * 15,
    "sixteen chat turns of 100 to 1,500 tokens (max_tokens 256)": [(100 + 93 * i, 256) for i in range(16)],
    "thirty-two short prompts of 10 to 40 tokens (max_tokens 16)": [(10 + i % 31, 16) for i in range(32)],
}


def main() -> None:
    for name, mix in MIXES.items():
        needed = [p + n for p, n in mix]
        pool = BlockPool(num_blocks=1 + sum(needed), block_size=16, prefix_caching=False)
        held = 0
        for p, n in mix:
            table = pool.reserve(list(range(p)), p + n).table
            held += len(table) * pool.block_size
        padded = len(mix) * max(needed)
        total = sum(needed)
        print(name)
        print(
            f"  tokens needed {total}; left-padded cache {padded} slots ({padded / total:.2f}x, "
            f"{1 - total / padded:.0%} waste); paged {held} slots ({held / total:.2f}x, {1 - total / held:.1%} waste)"
        )


if __name__ == "__main__":
    main()
