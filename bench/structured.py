"""What structured outputs cost: throughput with half the requests constrained by a JSON schema,
a constrained row's decode step against a free row's, and the time to compile a schema.

    python -m bench.structured                   # medium checkpoint, 1 and 16 clients, 3 rounds
    python -m bench.structured --quick           # 1 round, fewer requests and steps: a first look
    python -m bench.structured --parts compile   # any of throughput,step,compile
    python -m bench.structured --threads 1       # torch on 1 thread here and in the server (a busy machine)
    python -m bench.structured --real-tokenizer DIR   # MiniCPM-2B's tokenizer.model (default:
                                                      # $MINICPM_REAL_TOKENIZER, else ../shared/minicpm-2b-tokenizer)

Three parts (run as compile, step, throughput; the server is up only during its own):

throughput  Our server (`api.py --engine native --device cpu`) on the benchmark checkpoint, closed-
            loop clients on POST /v1/chat/completions at 1 and 16 clients, two mixes of the same
            requests: `free` (no constraint) and `mixed` (every other request carries
            `response_format` json_schema SCHEMA; at 16 clients half the rows in flight are
            constrained). Every request has the same prompt, temperature 1.0, a seed fixed by its
            place in the run (the same in both mixes), `ignore_eos` and `--new-tokens`; SCHEMA asks
            for at least 64 strings, so no constrained answer can be complete (and end as "stop")
            within that budget. Tokens counted are `usage.completion_tokens`; answers that came back
            short are counted and shown. The mixes alternate (free, mixed, free, ...) for
            `--repeats` rounds; the table shows medians and mixed/free (target: at least 0.90).
            Then the cache seen from a client: a 1-token request with a schema the server has not
            seen (compiled while it waits) against the same schema again (cached) and a free one.
step        In-process, no HTTP: the checkpoint in a NativeEngine whose loop step is timed. A batch
            of N free rows, then N rows constrained by SCHEMA, then N by the same list with
            strings of any length (UNBOUNDED_SCHEMA), prepared (compiled) before they are
            submitted, each `--steps` decode steps; only steps with all N rows running and nobody
            joining count (a step is decode, sampling with the grammar masks, and advancing the
            grammars; "grammar" is the time in the runner's masking and the grammars' advancing).
            Kinds alternate for `--rounds`; medians, and constrained/free (target: at most 1.2).
            With the real tokenizer, also on the same shape with MiniCPM-2B's vocabulary
            (`--no-step-real-vocab` leaves it out; built once, like the other checkpoints).
compile     GrammarCompiler (engine/grammar.py) on the benchmark checkpoint's vocabulary and on
            MiniCPM-2B's (122,753 tokens): building it (reading the vocabulary, once per server),
            then for four schemas (a small object, the two lists above, a 2.5 kB order with nested
            objects, patterns, enums, anyOf and bounded strings) the first compile of a schema
            text it has not seen (median over copies that differ only in their `description`), the
            cached lookup of the same text, making a matcher (once per request, on the engine
            thread), and per decode step of one row: filling its mask and advancing its grammar
            (64 steps, the token picked at random among the allowed ones).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import requests
import torch

from bench.compare import wait_healthy
from bench.load import PROMPT
from bench.peers import CACHE, REPO, our_server, port_free, start_server, stop_server
from minicpm_server.engine.grammar import GrammarCompiler
from minicpm_server.engine.native.engine import NativeEngine
from minicpm_server.engine.protocol import Constraint, Finished, GenerationRequest, SamplingParams
from minicpm_server.model.chat import conversation, render_chat
from minicpm_server.model.checkpoint import load_checkpoint
from minicpm_server.model.tiny import SIZES, cached_tiny_checkpoint
from minicpm_server.model.tokenizer import load_tokenizer

QUESTION = PROMPT + " 请用 JSON 列出登山要带的东西。"
TEMPERATURE = 1.0
# The constrained requests' schema: at least 64 short strings, so an answer needs well over 64
# tokens and never completes (EOS allowed only then) within the token budget.
SCHEMA: dict = {
    "type": "object",
    "properties": {"items": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 64}},
    "required": ["items"],
}
# The same list with strings of any length. Bounded lengths are what xgrammar finds costly on a
# large vocabulary (compile time, and each step's mask inside a bounded string): both are timed.
UNBOUNDED_SCHEMA: dict = {
    "type": "object",
    "properties": {"items": {"type": "array", "items": {"type": "string"}, "minItems": 64}},
    "required": ["items"],
}
STEP_SCHEMAS = {"list, maxLength 12": SCHEMA, "list, any length": UNBOUNDED_SCHEMA}
# Schemas for compile times, small to large.
SMALL_SCHEMA: dict = {
    "type": "object",
    "properties": {"answer": {"type": "string"}, "confidence": {"type": "number"}},
    "required": ["answer", "confidence"],
}
ADDRESS = {
    "type": "object",
    "properties": {
        "street": {"type": "string", "maxLength": 80},
        "city": {"type": "string", "maxLength": 40},
        "postcode": {"type": "string", "pattern": "^[0-9]{6}$"},
        "country": {"type": "string", "enum": ["CN", "US", "DE", "FR", "JP", "KR", "GB", "IN"]},
    },
    "required": ["street", "city", "postcode", "country"],
    "additionalProperties": False,
}
LARGE_SCHEMA: dict = {
    "type": "object",
    "properties": {
        "order_id": {"type": "string", "pattern": "^ORD-[0-9]{8}$"},
        "created": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z$"},
        "status": {"type": "string", "enum": ["pending", "paid", "shipped", "delivered", "cancelled", "refunded"]},
        "customer": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "minLength": 1, "maxLength": 60},
                "email": {"type": "string", "pattern": "^[a-z0-9._]+@[a-z0-9-]+\\.[a-z]{2,6}$"},
                "phone": {"type": "string", "pattern": "^\\+?[0-9 -]{7,15}$"},
                "vip": {"type": "boolean"},
                "billing": ADDRESS,
                "shipping": ADDRESS,
            },
            "required": ["name", "email", "billing"],
            "additionalProperties": False,
        },
        "lines": {
            "type": "array",
            "minItems": 1,
            "maxItems": 50,
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
                    "title": {"type": "string", "maxLength": 100},
                    "quantity": {"type": "integer", "minimum": 1, "maximum": 999},
                    "unit_price": {"type": "number", "minimum": 0},
                    "tags": {"type": "array", "items": {"type": "string", "enum": ["gift", "fragile", "bulk", "sale"]}},
                },
                "required": ["sku", "quantity", "unit_price"],
                "additionalProperties": False,
            },
        },
        "payment": {
            "anyOf": [
                {
                    "type": "object",
                    "properties": {"method": {"const": "card"}, "last4": {"type": "string", "pattern": "^[0-9]{4}$"}},
                    "required": ["method", "last4"],
                },
                {
                    "type": "object",
                    "properties": {"method": {"const": "transfer"}, "iban": {"type": "string", "maxLength": 34}},
                    "required": ["method", "iban"],
                },
                {"type": "object", "properties": {"method": {"const": "cash"}}, "required": ["method"]},
            ]
        },
        "discount": {"type": ["number", "null"]},
        "notes": {"type": "string", "maxLength": 500},
    },
    "required": ["order_id", "created", "status", "customer", "lines", "payment"],
    "additionalProperties": False,
}
COMPILE_SCHEMAS = {"small": SMALL_SCHEMA, **STEP_SCHEMAS, "large": LARGE_SCHEMA}
THROUGHPUT_TARGET, STEP_TARGET = 0.90, 1.2


def schema_text(schema: dict) -> str:
    """As the server keys its cache (api/structured.py: json.dumps, keys in order)."""
    return json.dumps(schema, ensure_ascii=False)


def verdict(ok: bool) -> str:
    return "met" if ok else "missed"


# --------------------------------------------------------------------------- throughput (HTTP)


@dataclass
class Cell:
    """One closed-loop run: every request's (constrained, seconds, completion tokens, finish reason)."""

    seconds: float
    answers: list[tuple[bool, float, int, str]]

    @property
    def tokens(self) -> int:
        return sum(a[2] for a in self.answers)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds

    def short(self, new_tokens: int, constrained: bool) -> int:
        return sum(1 for c, _, n, reason in self.answers if c == constrained and (n < new_tokens or reason != "length"))


def chat_body(seed: int, new_tokens: int, schema: dict | None) -> dict:
    body = {
        "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": new_tokens,
        "temperature": TEMPERATURE,
        "seed": seed,
        "ignore_eos": True,
    }
    if schema is not None:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "packing_list", "schema": schema}}
    return body


def post_chat(session: requests.Session, url: str, body: dict) -> tuple[float, int, str]:
    start = time.perf_counter()
    r = session.post(url + "/v1/chat/completions", json=body, timeout=600)
    seconds = time.perf_counter() - start
    if r.status_code != 200:
        raise RuntimeError(f"{r.status_code} {r.text[:300]}")
    answer = r.json()
    return seconds, answer["usage"]["completion_tokens"], answer["choices"][0]["finish_reason"]


def closed_loop(url: str, clients: int, per_client: int, new_tokens: int, mixed: bool) -> Cell:
    """`clients` clients, each sending `per_client` requests back to back; in the mixed run request
    j of client i is constrained when i + j is odd, so half the rows in flight are."""

    def client(i: int) -> list[tuple[bool, float, int, str]]:
        out = []
        with requests.Session() as session:
            for j in range(per_client):
                constrained = mixed and (i + j) % 2 == 1
                body = chat_body(1000 * i + j, new_tokens, SCHEMA if constrained else None)
                out.append((constrained, *post_chat(session, url, body)))
        return out

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        answers = [a for batch in pool.map(client, range(clients)) for a in batch]
    return Cell(time.perf_counter() - start, answers)


def per_client_requests(clients: int, quick: bool) -> int:
    """8 requests (quick: 4) from 1 client; from more, 4 (quick: 2) each."""
    return (8 if clients == 1 else 4) // (2 if quick else 1)


def cache_probe(url: str, probes: int) -> dict[str, float]:
    """Median seconds of a 1-token request: free, with a schema the server has not seen, and that
    schema again (its grammar now cached)."""
    times: dict[str, list[float]] = {"free": [], "new schema": [], "cached schema": []}
    tag = f"{os.getpid()}-{time.time_ns()}"
    with requests.Session() as session:
        for k in range(probes):
            schema = {**SCHEMA, "description": f"cache probe {tag}-{k}"}  # new text, same grammar
            times["free"].append(post_chat(session, url, chat_body(k, 1, None))[0])
            times["new schema"].append(post_chat(session, url, chat_body(k, 1, schema))[0])
            times["cached schema"].append(post_chat(session, url, chat_body(k, 1, schema))[0])
    return {name: statistics.median(xs) for name, xs in times.items()}


def run_throughput(args, model: Path) -> None:
    print(
        f"\n== throughput: our server on {model.name}, {args.new_tokens} tokens per request, POST /v1/chat/completions"
    )
    port = args.port
    while not port_free(port):
        port += 1
    server = our_server("ours", sys.executable, "native", model, port)
    if args.threads:
        server.env["OMP_NUM_THREADS"] = str(args.threads)  # torch's intra-op threads in the server
    url = f"http://127.0.0.1:{port}"
    log_file = Path(tempfile.mkdtemp(prefix="minicpm-structured-")) / "server.log"
    proc = start_server(server, log_file)
    runs: dict[tuple[int, str], list[Cell]] = {(c, mix): [] for c in args.concurrency for mix in ("free", "mixed")}
    try:
        wait_healthy(url, proc, timeout=600)
        print(f"  server ready (log {log_file})", flush=True)
        # Warm-up: both kinds (the schema's grammar is compiled here, then cached), then a burst.
        closed_loop(url, 1, 2, args.new_tokens, mixed=True)
        closed_loop(url, max(args.concurrency), 2, 8, mixed=True)
        for repeat in range(1, args.repeats + 1):
            for clients in args.concurrency:
                for mix in ("free", "mixed"):
                    cell = closed_loop(
                        url, clients, per_client_requests(clients, args.quick), args.new_tokens, mix == "mixed"
                    )
                    runs[clients, mix].append(cell)
                    shorts = f"short answers: free {cell.short(args.new_tokens, False)}"
                    if mix == "mixed":
                        shorts += f", constrained {cell.short(args.new_tokens, True)}"
                    print(
                        f"  round {repeat} c={clients:<2d} {mix:5s} {cell.tokens_per_second:7.1f} tok/s "
                        f"({len(cell.answers)} requests, {cell.tokens} tokens, {cell.seconds:.1f} s; {shorts})",
                        flush=True,
                    )
        probe = cache_probe(url, args.cache_probes)
    finally:
        stop_server(proc)
    print("\n| clients | free tok/s | half constrained tok/s | mixed/free | target >= 0.90 |")
    print("| --- | --- | --- | --- | --- |")
    for clients in args.concurrency:
        free = statistics.median(c.tokens_per_second for c in runs[clients, "free"])
        mixed = statistics.median(c.tokens_per_second for c in runs[clients, "mixed"])
        ratio = mixed / free
        print(f"| {clients} | {free:.1f} | {mixed:.1f} | {ratio:.2f} | {verdict(ratio >= THROUGHPUT_TARGET)} |")
    short = sum(c.short(args.new_tokens, True) + c.short(args.new_tokens, False) for cs in runs.values() for c in cs)
    print(f"medians of {args.repeats} round(s); answers shorter than {args.new_tokens} tokens: {short}")
    print(
        f"1-token request, median of {args.cache_probes}: free {probe['free'] * 1000:.1f} ms, "
        f"new schema {probe['new schema'] * 1000:.1f} ms, same schema again (cached) {probe['cached schema'] * 1000:.1f} ms"
    )


# --------------------------------------------------------------------------- per step (in process)


class TimedEngine(NativeEngine):
    """The native engine, keeping (rows, seconds, of which grammar seconds) of every loop step that
    only decoded. Grammar time is the runner's masking (filling each constrained row's mask, applying
    them) and the engine's advancing of each row's grammar by its new token."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.steps: list[tuple[int, float, float]] = []
        self._grammar_seconds = 0.0
        mask = self.runner._mask_to_grammars

        def timed_mask(*a):
            start = time.perf_counter()
            try:
                return mask(*a)
            finally:
                self._grammar_seconds += time.perf_counter() - start

        self.runner._mask_to_grammars = timed_mask  # this engine's runner only

    def _follow_grammar(self, seq, token):
        start = time.perf_counter()
        try:
            return NativeEngine._follow_grammar(seq, token)
        finally:
            self._grammar_seconds += time.perf_counter() - start

    def _step(self, newcomers) -> None:
        batch = self.scheduler.batch
        rows = 0 if newcomers or batch is None else len(batch.seqs)
        self._grammar_seconds = 0.0
        start = time.perf_counter()
        super()._step(newcomers)
        if rows:
            self.steps.append((rows, time.perf_counter() - start, self._grammar_seconds))


async def run_batch(engine: TimedEngine, prompt: list[int], rows: int, steps: int, constraint: Constraint | None):
    """Median seconds per decode step with all `rows` rows running, of which grammar work, and how
    many such steps there were."""
    engine.steps.clear()
    wanted = [
        engine.prepare(
            GenerationRequest(
                prompt,
                SamplingParams(steps + 1, temperature=TEMPERATURE, seed=i, ignore_eos=True, constraint=constraint),
            )
        )
        for i in range(rows)
    ]
    handles = [engine.submit(request) for request in wanted]

    async def finish(handle) -> Finished:
        async for event in handle.events():
            if isinstance(event, Finished):
                return event
        raise RuntimeError("no Finished event")

    done = await asyncio.gather(*(finish(h) for h in handles))
    if any(f.reason != "length" or f.completion_tokens != steps + 1 for f in done):
        print(f"    warning: answers ended early: {[(f.reason, f.completion_tokens) for f in done]}")
    full = [(seconds, grammar) for n, seconds, grammar in engine.steps if n == rows]
    return statistics.median(s for s, _ in full), statistics.median(g for _, g in full), len(full)


def step_times(label: str, checkpoint: Path, args) -> list[tuple[str, int, str, float, float, float]]:
    """(checkpoint, rows, schema, free s/step, constrained s/step, of which grammar) per rows and schema."""
    loaded = load_checkpoint(checkpoint, device="cpu", dtype="float32")
    config = json.loads((checkpoint / "config.json").read_text())
    prompt = loaded.tokenizer.encode(render_chat(loaded.tokenizer, conversation(QUESTION)))
    engine = TimedEngine(
        loaded.model,
        loaded.tokenizer,
        context_window=loaded.context_window,
        eos_token_id=config["eos_token_id"],
        max_batch=max(args.step_rows),
        kv_cache_tokens=max(args.step_rows) * (len(prompt) + args.steps + 64),
    )
    kinds: dict[str, Constraint | None] = {"free": None}
    kinds |= {name: Constraint("json", schema_text(schema)) for name, schema in STEP_SCHEMAS.items()}
    print(f"  {label}: {checkpoint.name}, vocabulary {config['vocab_size']}, prompt {len(prompt)} tokens", flush=True)
    out = []

    async def run() -> None:
        engine.start()
        try:
            for constraint in kinds.values():  # warm-up; the grammars are compiled (and cached) here
                await run_batch(engine, prompt, 2, 4, constraint)
            for rows in args.step_rows:
                times: dict[str, list[float]] = {kind: [] for kind in kinds}
                grammar: dict[str, list[float]] = {kind: [] for kind in kinds}
                for _ in range(args.rounds):
                    for kind, constraint in kinds.items():
                        seconds, in_grammar, counted = await run_batch(engine, prompt, rows, args.steps, constraint)
                        times[kind].append(seconds)
                        grammar[kind].append(in_grammar)
                        print(
                            f"    {rows:2d} rows {kind:18s} {seconds * 1000:7.2f} ms/step, grammar "
                            f"{in_grammar * 1000:6.2f} ms ({counted} steps)",
                            flush=True,
                        )
                free = statistics.median(times["free"])
                out.extend(
                    (label, rows, kind, free, statistics.median(times[kind]), statistics.median(grammar[kind]))
                    for kind in STEP_SCHEMAS
                )
        finally:
            engine.stop()

    with torch.inference_mode():
        asyncio.run(run())
    return out


def run_steps(args, model: Path, real: Path | None) -> None:
    print(f"\n== per decode step: in-process NativeEngine, {args.steps} steps per batch, {args.rounds} round(s)")
    results = step_times("bench", model, args)
    if real is not None and args.step_real_vocab:
        real_model = cached_tiny_checkpoint(CACHE, args.size, seed=0, tokenizer_from=real)
        results += step_times("real vocab", real_model, args)
    print(
        "\n| checkpoint | rows | free ms/step | schema | constrained ms/step | of which grammar ms "
        "| constrained/free | target <= 1.2 |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for label, rows, schema, free, constrained, grammar in results:
        ratio = constrained / free
        print(
            f"| {label} | {rows} | {free * 1000:.2f} | {schema} | {constrained * 1000:.2f} | {grammar * 1000:.2f} "
            f"| {ratio:.2f} | {verdict(ratio <= STEP_TARGET)} |"
        )


# --------------------------------------------------------------------------- compile


def timed(fn, *a):
    start = time.perf_counter()
    value = fn(*a)
    return value, time.perf_counter() - start


def per_row_step(compiler: GrammarCompiler, compiled, steps: int = 64) -> tuple[float, float]:
    """Median seconds to fill one row's mask and to advance its grammar, over `steps` tokens picked
    at random among the allowed ones."""
    import xgrammar as xgr

    matcher = compiler.matcher(compiled)
    bitmask = xgr.allocate_token_bitmask(1, compiler.vocab_size)
    generator = torch.Generator().manual_seed(0)
    fills, accepts = [], []
    for _ in range(steps):
        start = time.perf_counter()
        matcher.fill_next_token_bitmask(bitmask, 0)
        fills.append(time.perf_counter() - start)
        logits = torch.rand(1, compiler.vocab_size, generator=generator)
        xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=compiler.vocab_size)
        token = int(logits.argmax())
        start = time.perf_counter()
        if not matcher.accept_token(token):
            raise RuntimeError(f"grammar refused token {token} that its mask allowed")
        accepts.append(time.perf_counter() - start)
        if matcher.is_terminated():
            break
    return statistics.median(fills), statistics.median(accepts)


def compile_times(label: str, tokenizer, vocab_size: int, eos: int, copies: int) -> None:
    import xgrammar  # noqa: F401  (imported before the first build is timed)

    builds = []
    for _ in range(copies):
        compiler, seconds = timed(GrammarCompiler, tokenizer, vocab_size, eos)
        builds.append(seconds)
    print(f"\n{label}: vocabulary {vocab_size}; building the GrammarCompiler {statistics.median(builds) * 1000:.0f} ms")
    print(
        "| schema | chars | first compile ms | cached compile us | matcher us | mask fill us/row/step | advance us/row/step |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, schema in COMPILE_SCHEMAS.items():
        firsts = []
        for k in range(copies):
            text = schema_text({**schema, "description": f"copy {k} of {name}"})  # a text not seen before
            compiled, seconds = timed(compiler.compile, Constraint("json", text))
            firsts.append(seconds)
        constraint = Constraint("json", text)
        cached = []
        for _ in range(200):
            cached.append(timed(compiler.compile, constraint)[1])
        matchers = [timed(compiler.matcher, compiled)[1] for _ in range(20)]
        fill, advance = per_row_step(compiler, compiled)
        print(
            f"| {name} | {len(schema_text(schema))} | {statistics.median(firsts) * 1000:.1f} | "
            f"{statistics.median(cached) * 1e6:.1f} | {statistics.median(matchers) * 1e6:.0f} | "
            f"{fill * 1e6:.0f} | {advance * 1e6:.0f} |"
        )


def run_compile(args, model: Path, real: Path | None) -> None:
    copies = 1 if args.quick else 3
    print(f"\n== compile: GrammarCompiler, medians of {copies} build(s) / first compile(s), 200 cached lookups")
    config = json.loads((model / "config.json").read_text())
    compile_times("bench", load_tokenizer(model), config["vocab_size"], config["eos_token_id"], copies)
    if real is None:
        print("\nreal vocabulary: no tokenizer.model found (--real-tokenizer, MINICPM_REAL_TOKENIZER): skipped")
        return
    tokenizer = load_tokenizer(real)
    # MiniCPM-2B's config: vocab_size 122,753, as many as the tokenizer's pieces.
    compile_times("real (MiniCPM-2B)", tokenizer, SIZES["full"].vocab_size, tokenizer.eos_token_id, copies)


# --------------------------------------------------------------------------- main


def default_real_tokenizer() -> str | None:
    found = os.environ.get("MINICPM_REAL_TOKENIZER")
    if found:
        return found
    shared = REPO.parent / "shared" / "minicpm-2b-tokenizer"  # the team's copy beside the clone (scripts/test.sh)
    return str(shared) if (shared / "tokenizer.model").is_file() else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="medium", choices=sorted(SIZES), help="benchmark checkpoint shape")
    parser.add_argument("--model-path", help="an existing MiniCPM checkpoint instead of a built one")
    parser.add_argument("--parts", default="throughput,step,compile", help="any of throughput,step,compile")
    parser.add_argument("--concurrency", default="1,16", help="client counts (throughput)")
    parser.add_argument("--repeats", type=int, help="rounds of free and mixed in turn (default 3; --quick 1)")
    parser.add_argument("--new-tokens", type=int, default=64, help="max_tokens of every request (ignore_eos)")
    parser.add_argument("--cache-probes", type=int, default=3, help="new-schema requests timed against cached ones")
    parser.add_argument("--step-rows", default="1,16", help="batch sizes for the per-step times")
    parser.add_argument("--steps", type=int, help="decode steps per batch (default 32; --quick 16)")
    parser.add_argument("--rounds", type=int, help="free/constrained batches in turn (default 3; --quick 1)")
    parser.add_argument(
        "--step-real-vocab",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time steps on the same shape with the real vocabulary (needs the real tokenizer)",
    )
    parser.add_argument(
        "--real-tokenizer", default=default_real_tokenizer(), help="dir with MiniCPM-2B's tokenizer.model"
    )
    parser.add_argument("--port", type=int, default=6321, help="first port to try (127.0.0.1)")
    parser.add_argument(
        "--threads",
        type=int,
        help="torch threads, here and in the server (OMP_NUM_THREADS); default torch's. On a 2-core machine "
        "that others also use, 1 can be many times faster than 2 (bench/peers.py, ours-1t)",
    )
    parser.add_argument("--quick", action="store_true", help="1 round, fewer requests and steps")
    args = parser.parse_args()
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if set(parts) - {"throughput", "step", "compile"}:
        parser.error("--parts takes throughput, step, compile")
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.step_rows = [int(r) for r in args.step_rows.split(",")]
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.steps = args.steps or (16 if args.quick else 32)
    if args.new_tokens > 64 or args.steps + 1 > 64:
        print("note: more than 64 tokens: a constrained answer may complete and end early", file=sys.stderr)
    model = Path(args.model_path) if args.model_path else cached_tiny_checkpoint(CACHE, args.size, seed=0)
    real = Path(args.real_tokenizer) if args.real_tokenizer else None
    if real is not None and not (real / "tokenizer.model").is_file():
        parser.error(f"--real-tokenizer {real}: no tokenizer.model there")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"checkpoint {model}; real tokenizer {real or 'none'}; torch threads {torch.get_num_threads()}")
    if "compile" in parts:
        run_compile(args, model, real)
    if "step" in parts:
        run_steps(args, model, real)
    if "throughput" in parts:
        run_throughput(args, model)


if __name__ == "__main__":
    main()
