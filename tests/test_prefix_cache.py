"""Prefix reuse: a chat's next turn does not recompute its history, and answers do not change."""

from __future__ import annotations

import requests

from minicpm_server.engine.native.blocks import BlockPool
from minicpm_server.engine.protocol import GenerationRequest
from minicpm_server.model import chat
from tests.harness import greedy, metric, result, run

QUESTIONS = [
    "what is the river city of code and how are you " * 4,
    "你好，山东省最高的山是哪座山？",
    "hello world, the model answers what",
    "how are you",
]


def converse(loaded, **engine_kwargs):
    """Four greedy chat turns, each resending the whole history as chat clients do."""

    async def body(engine):
        history, answers, prefilled = [], [], []
        for question in QUESTIONS:
            messages = chat.conversation(question, history)
            ids = loaded.tokenizer.encode(chat.render_chat(loaded.tokenizer, messages))
            before = engine.kv_stats.prefilled_tokens
            answer = (await result(engine.submit(GenerationRequest(ids, greedy(24))))).text
            prefilled.append((len(ids), engine.kv_stats.prefilled_tokens - before))
            answers.append(answer)
            history += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        return answers, prefilled, engine.kv_stats

    return run(loaded, body, **engine_kwargs)


def test_later_turns_reuse_the_history_and_answer_the_same(loaded) -> None:
    cold_answers, cold, cold_stats = converse(loaded, prefix_caching=False)
    warm_answers, warm, warm_stats = converse(loaded, prefix_caching=True)
    assert warm_answers == cold_answers
    assert [p for p, _ in warm] == [p for p, _ in cold]  # the same prompts
    assert all(computed == prompt for prompt, computed in cold)  # no reuse: every token prefilled
    assert warm[0][1] == warm[0][0]  # nothing to reuse on the first turn
    for (prompt, computed), (previous, _) in zip(warm[1:], warm, strict=False):
        # At least the whole previous prompt was reused, its last partial block included.
        assert computed <= prompt - previous
    assert warm_stats.prefix_hit_tokens == sum(p - c for p, c in warm) > 0
    assert cold_stats.prefix_hit_tokens == 0 and cold_stats.cached_prefix_tokens == 0


def test_identical_prompts_share_blocks_while_running(loaded) -> None:
    ids = [1, *range(10, 80)]  # 71 tokens: 4 full blocks can be shared, the last token is computed

    async def body(engine):
        first = await result(engine.submit(GenerationRequest(ids, greedy(8))))
        second = await result(engine.submit(GenerationRequest(ids, greedy(8))))
        return first, second, engine.kv_stats

    first, second, stats = run(loaded, body, prefix_caching=True)
    assert first.text == second.text
    # 4 shared blocks, then 6 tokens copied from the first request's last block: 1 token computed.
    assert stats.prefix_hit_tokens == 70 and stats.prefilled_tokens == 71 + 1


def test_cached_prefixes_are_evicted_least_recently_used_first() -> None:
    pool = BlockPool(num_blocks=9, block_size=4)  # 8 usable blocks

    def finish(prompt: list[int], total: int) -> None:
        reservation = pool.reserve(prompt, total)
        pool.index(reservation.table, prompt, len(prompt), [])
        pool.release(reservation.table)

    old, recent = [1, *range(100, 108)], [2, *range(200, 208)]  # 9 tokens: 2 full blocks each
    finish(old, 12)
    finish(recent, 12)
    assert pool.cached == 4 and pool.used == 4 and pool.available == 8  # cached, yet evictable
    table, reused, _ = pool.reserve(recent, 12)
    assert reused == 8  # found again
    pool.release(table)
    table, reused, _ = pool.reserve([5] * 9, 24)  # 6 blocks: 4 free, then the 2 least recently used
    assert reused == 0 and pool.evictions == 2
    pool.release(table)
    assert pool.reserve(old, 12)[1] == 0  # the old prefix was evicted
    assert pool.cached == 2  # the recent one was not


def finished(pool: BlockPool, prompt: list[int], total: int, computed: int) -> list[int]:
    """A request of `prompt` that ended with `computed` tokens in its blocks (prompt + answer)."""
    reservation = pool.reserve(prompt, total)
    assert reservation is not None and reservation.copy is None
    tokens = prompt + list(range(900, 900 + computed - len(prompt)))
    pool.index(reservation.table, prompt, len(prompt), digests := [])
    pool.index(reservation.table, tokens, computed, digests, finished=True)
    pool.release(reservation.table)
    return reservation.table


def test_a_repeated_prompt_reuses_all_but_its_last_token_by_copying_the_partial_block() -> None:
    pool = BlockPool(num_blocks=17, block_size=4)
    prompt = list(range(1, 12))  # 11 tokens: blocks of 4, 4 and 3
    first = finished(pool, prompt, total=16, computed=13)  # the last block holds 11, 12, 13 (+1 answer)
    again = pool.reserve(prompt, 16)
    assert again is not None
    assert again.table[:2] == first[:2]  # the whole blocks are shared
    assert again.cached == 10  # and the third block's first 2 tokens copied: 1 token left to compute
    assert again.copy == (first[2], again.table[2]) and again.table[2] not in first
    pool.release(again.table)
    assert pool.used == pool.cached  # nothing held after release: only indexed blocks remain


def test_prompts_that_part_mid_block_reuse_the_tokens_they_share() -> None:
    pool = BlockPool(num_blocks=17, block_size=4)
    first = finished(pool, list(range(1, 11)), total=12, computed=10)
    other = [1, 2, 3, 4, 5, 6, 77, 78, 79, 80]  # agrees with the first prompt for 6 tokens
    reservation = pool.reserve(other, 12)
    assert reservation is not None and reservation.table[0] == first[0]
    assert reservation.cached == 6 and reservation.copy == (first[1], reservation.table[1])
    unrelated = pool.reserve([50, 51, 52, 53, 54], 8)
    assert unrelated is not None and unrelated.cached == 0 and unrelated.copy is None


def test_a_partial_block_is_copied_never_shared_and_its_source_never_evicted_meanwhile() -> None:
    pool = BlockPool(num_blocks=3, block_size=4)  # 2 usable blocks
    prompt = [1, 2, 3, 4, 5, 6]
    first = finished(pool, prompt, total=8, computed=7)  # block 1 is a partial entry: 5, 6, 900
    assert pool.cached == 2 and pool.available == 2
    # Reusing it needs a fresh block to copy into; the only candidates are the two cached blocks
    # this reservation would read, so it must wait rather than evict its own source.
    assert pool.reserve(prompt, 8) is None
    assert pool.cached == 2 and pool.available == 2 and pool.evictions == 0
    # A prompt needing the space evicts both, least recently used first, and finds nothing after.
    taken = pool.reserve([40, 41, 42, 43, 44], 8)
    assert taken is not None and sorted(taken.table) == sorted(first) and pool.evictions == 2
    pool.release(taken.table)
    assert pool.cached == 0 and pool.reserve(prompt, 8).copy is None


def test_metrics_report_prefix_hits_and_kv_memory(server) -> None:
    """A chat's second turn resends the first: /metrics counts the prompt tokens reused."""

    def sample(name: str) -> float:
        return metric(server.url, name, required=True)

    capacity = sample("minicpm_kv_cache_capacity_tokens")
    assert capacity > 0 and 0 <= sample("minicpm_kv_cache_used_tokens") <= capacity
    question = {"role": "user", "content": "tell me about the mountains and rivers of Shandong province " * 3}
    body = {"messages": [question], "max_tokens": 8, "temperature": 0}
    first = requests.post(server.url + "/v1/chat/completions", json=body, timeout=120).json()
    before = sample("minicpm_prefix_cache_hit_tokens_total")
    answer = {"role": "assistant", "content": first["choices"][0]["message"]["content"]}
    body["messages"] = [question, answer, {"role": "user", "content": "and the lakes?"}]
    second = requests.post(server.url + "/v1/chat/completions", json=body, timeout=120)
    assert second.status_code == 200
    reused = sample("minicpm_prefix_cache_hit_tokens_total") - before
    # at least the first turn's whole prompt
    assert reused >= first["usage"]["prompt_tokens"] > 0
