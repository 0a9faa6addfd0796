"""The native engine on a real GPU: `python -m pytest -m gpu` (skipped where CUDA is not usable).

What runs only on CUDA and what it must do there (docs/architecture.md lists every CUDA-only
branch; tests/test_cuda_paths.py covers them on CPU as far as a CPU can):
greedy answers equal transformers' generate() on the same GPU, in float32 and bfloat16; the
decode step reads the device once (the sampled ids); sampling draws what main's sampler draws
from the same CUDA generators; the KV budget comes from free GPU memory; --compile records CUDA
graphs and answers as the eager step does; idle releases cached memory; a real server answers
over HTTP. Sized to finish in a few minutes on one GPU from a bare checkout (tiny checkpoints,
built at test time like every other test's).
"""

from __future__ import annotations

import asyncio

import pytest
import requests
import torch

from minicpm_server.engine.native.sampling import BatchSampling, draw_tokens, settle
from minicpm_server.engine.protocol import SamplingParams
from minicpm_server.model.checkpoint import load_checkpoint
from tests import sampling_main
from tests.harness import PROMPTS, greedy, ids_for, result, run, submit
from tests.host_reads import HostReads

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (python -m pytest -m gpu on one)"),
]


def cuda_loaded(path, dtype: str):
    return load_checkpoint(path, device="cuda", dtype=dtype)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_greedy_answers_equal_generate_on_the_gpu(tiny_dir, dtype: str) -> None:
    loaded = cuda_loaded(tiny_dir, dtype)

    async def body(engine):
        together = await asyncio.gather(*(result(submit(engine, loaded, p, greedy(20))) for p in PROMPTS))
        return [c.text for c in together], engine.kv_stats.capacity_tokens

    texts, capacity = run(loaded, body)
    assert capacity > loaded.context_window  # sized from free GPU memory (budget.py), far above one window
    reference = cuda_loaded(tiny_dir, dtype)  # a separate load: the engine re-lays its weights out
    for prompt, text in zip(PROMPTS, texts, strict=True):
        ids = torch.tensor([ids_for(reference, prompt)], device="cuda")
        out = reference.model.generate(ids, max_new_tokens=20, do_sample=False, repetition_penalty=1.02)
        expected = reference.tokenizer.decode(out[0, ids.shape[1] :].tolist())
        if dtype == "float32":
            assert text == expected
        else:  # bf16: the lean step's fused products may round differently; the start must agree
            assert text[:8] == expected[:8]


def test_the_decode_step_reads_the_gpu_once(tiny_dir) -> None:
    loaded = cuda_loaded(tiny_dir, "float32")
    counted: list[int] = []

    async def body(engine):
        step = engine._step

        def counting_step(newcomers):
            if newcomers or engine.scheduler.batch is None:
                return step(newcomers)
            with HostReads() as reads:
                step(newcomers)
            counted.append(reads.total)

        engine._step = counting_step
        tutorial = SamplingParams(max_new_tokens=16, ignore_eos=True, temperature=0.5, top_p=0.8)
        seeded = SamplingParams(max_new_tokens=16, ignore_eos=True, seed=4, top_k=30)
        await asyncio.gather(
            result(submit(engine, loaded, PROMPTS[0], tutorial)), result(submit(engine, loaded, PROMPTS[1], seeded))
        )

    run(loaded, body)
    assert counted and counted.count(1) >= len(counted) - 1 and max(counted) <= 2, counted


def test_sampling_on_the_gpu_draws_what_main_drew() -> None:
    cuda = torch.device("cuda")
    params = [
        SamplingParams(max_new_tokens=4, temperature=0.5, top_p=0.8, repetition_penalty=1.02),
        SamplingParams(max_new_tokens=4, temperature=1.0, top_p=1.0, min_p=0.05),
        SamplingParams(max_new_tokens=4, top_k=40, presence_penalty=0.2),
        SamplingParams(max_new_tokens=4, do_sample=False),
    ]
    for scale in (0.3, 15.0):

        def generators() -> list[torch.Generator | None]:
            return [None, torch.Generator(device=cuda).manual_seed(5), None, None]

        ours = BatchSampling.build(params, generators(), cuda)
        theirs = BatchSampling.build(params, generators(), cuda)
        shared = [torch.Generator(device=cuda).manual_seed(0) for _ in range(2)]
        seen = torch.zeros(4, 5000, dtype=torch.bool, device=cuda)
        counts = torch.zeros(4, 5000, dtype=torch.int32, device=cuda)
        for step in range(3):
            logits = torch.randn(4, 5000, device=cuda, generator=torch.Generator(device=cuda).manual_seed(step)) * scale
            expected = sampling_main.sample_next_tokens(logits, seen, theirs, shared[0], counts).tolist()
            _, got = settle(draw_tokens(logits, seen, ours, shared[1], counts), ours)
            assert got == expected, (scale, step)


def test_compiled_cuda_graph_step_answers_as_the_eager_one(tiny_dir) -> None:
    def answers(compile: bool):
        loaded = cuda_loaded(tiny_dir, "float32")

        async def body(engine):
            texts = [(await result(submit(engine, loaded, p, greedy(16)))).text for p in PROMPTS[:2]]
            return texts, engine.runner.decode.is_compiled

        return run(loaded, body, compile=compile)

    eager, _ = answers(False)
    compiled, still_compiled = answers(True)
    assert still_compiled and compiled == eager


def test_idle_releases_cached_gpu_memory(tiny_dir) -> None:
    loaded = cuda_loaded(tiny_dir, "float32")

    async def body(engine):
        await result(submit(engine, loaded, PROMPTS[0], greedy(8)))
        for _ in range(100):  # the engine releases when it finds itself idle (it waits up to 1 s)
            if engine.stats.cache_releases >= 1:
                break
            await asyncio.sleep(0.1)
        return engine.stats.cache_releases

    assert run(loaded, body) >= 1


def test_a_server_on_the_gpu_answers(start_server, tiny_dir) -> None:
    server = start_server("--model-path", tiny_dir, "--device", "cuda", "--max-batch", "8")
    r = requests.post(server.url + "/", json={"prompt": "你好"}, timeout=120)
    assert r.status_code == 200 and r.json()["status"] == 200
    body = {"prompt": "hello", "max_tokens": 8, "ignore_eos": True, "stream": True}
    with requests.post(server.url + "/v1/completions", json=body, stream=True, timeout=120) as streamed:
        lines = [line for line in streamed.iter_lines() if line.startswith(b"data: ")]
    assert lines[-1] == b"data: [DONE]"
