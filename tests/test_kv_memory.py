"""Bounded KV memory: requests are admitted by tokens, the rest wait, nothing fails under overload."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from minicpm_server.engine.native.blocks import BlockPool
from minicpm_server.engine.protocol import GenerationRequest
from minicpm_server.model.checkpoint import load_checkpoint
from tests.harness import greedy, metric, result, run, until_running

# Mixed lengths: prompts of 3 to 200 tokens, budgets of 10 to 120 tokens.
MIXED = [(200, 20), (3, 120), (100, 10), (40, 100), (150, 50), (8, 30), (60, 120), (120, 100), (16, 15), (64, 60)]


@pytest.fixture(scope="module")
def short_loaded(window256_dir):
    return load_checkpoint(window256_dir, device="cpu", dtype="float32")


def mixed_requests(vocab: int) -> list[GenerationRequest]:
    return [
        GenerationRequest([1] + [(7 * i + 3 * n) % (vocab - 3) + 3 for n in range(prompt - 1)], greedy(new))
        for i, (prompt, new) in enumerate(MIXED)
    ]


def test_memory_in_use_never_exceeds_the_budget(short_loaded) -> None:
    loaded = short_loaded
    budget = 260  # tokens: under a third of what the load asks for at once, and more than one context window
    reqs = mixed_requests(loaded.model.config.vocab_size)
    assert sum(r.prompt_tokens + r.params.max_new_tokens for r in reqs) > 3 * budget
    samples: list[int] = []

    async def body(engine):
        pool = engine.scheduler.pool
        reserve = pool.reserve

        def watched(*args, **kwargs):  # the pool's use right after every reservation, successful or not
            got = reserve(*args, **kwargs)
            samples.append(pool.used * pool.block_size)
            return got

        pool.reserve = watched
        alone = [await result(engine.submit(r)) for r in reqs]
        together = await asyncio.gather(*(result(engine.submit(r)) for r in reqs))
        await until_running(engine, 0)  # a row's blocks go back just after its last event
        return alone, together, engine.kv_stats, engine.runner.cache

    alone, together, stats, cache = run(loaded, body, kv_cache_tokens=budget, max_batch=16)
    assert [c.text for c in together] == [c.text for c in alone]
    assert [c.completion_tokens for c in together] == [new for _, new in MIXED]
    assert stats.waited_for_memory > 0  # the load really was bigger than the budget
    assert max(samples) <= stats.capacity_tokens and stats.peak_used_tokens <= stats.capacity_tokens
    assert stats.capacity_tokens >= budget and stats.capacity_tokens < budget + 2 * 16
    assert stats.used_tokens == stats.cached_prefix_tokens  # every reservation was given back
    assert stats.evictions > 0  # cached prefixes live inside the budget: they made room when it was needed
    pool_bytes = sum(t.numel() * t.element_size() for t in (*cache.keys, *cache.values))
    config = loaded.model.config
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * 32 * 4  # float32, head_dim 32
    # Allocated once: the budget, the null block, and the compiled step's scratch slot.
    assert pool_bytes == (stats.capacity_tokens + 16 + 1) * per_token


def test_block_pool_reserves_whole_requests_and_evicts_cached_prefixes_lru() -> None:
    pool = BlockPool(num_blocks=9, block_size=4)  # 8 usable blocks, 32 tokens
    first = pool.reserve(list(range(1, 10)), 16)
    assert first is not None and first[1] == 0 and len(first[0]) == 4
    assert pool.reserve(list(range(1, 10)), 20) is None  # 5 blocks do not fit beside the first 4
    second = pool.reserve([1, 2], 16)
    assert second is not None and pool.available == 0
    pool.release(second[0])
    assert pool.available == 4 and pool.used == 4


def test_overload_through_the_server_waits_instead_of_failing(start_server, window256_dir) -> None:
    # 0.001 GiB of float32 KV on the tiny model (4 KiB per token) is 256 tokens: every request
    # below reserves over 85, so at most two can run at once although --max-batch allows 16.
    server = start_server(
        "--model-path", window256_dir, "--device", "cpu", "--max-batch", "16", "--kv-cache-gb", "0.001"
    )
    assert "KV cache: 256 tokens" in server.log()
    prompts = ["hello " * n for n in (1, 10, 40, 50, 3, 45, 20, 35, 2, 30, 25, 5)]
    peak = 0
    done = threading.Event()

    def watch() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, int(metric(server.url, "minicpm_requests_running")))
            time.sleep(0.02)

    def ask(prompt: str) -> requests.Response:
        body = {"prompt": prompt, "max_tokens": 80, "ignore_eos": True, "temperature": 0}
        return requests.post(server.url + "/v1/completions", json=body, timeout=600)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(len(prompts)) as pool:
            answers = list(pool.map(ask, prompts))
    finally:
        done.set()
        watcher.join()
    assert [a.status_code for a in answers] == [200] * len(prompts), [a.text for a in answers if a.status_code != 200]
    assert all(a.json()["usage"]["completion_tokens"] == 80 for a in answers)
    assert sum(a.json()["usage"]["total_tokens"] for a in answers) > 4 * 256
    assert 1 <= peak <= 2
    assert metric(server.url, "minicpm_engine_failures_total") == 0
