"""Ollama's answers: `/api/chat` and `/api/generate` objects, whole or as newline-delimited JSON as
the text comes, and the model descriptions of `/api/tags`, `/api/show` and `/api/ps`.

Beside responses.py (one formatter per endpoint of the tutorial and OpenAI) because Ollama's
shapes carry what those do not: the request's timings in nanoseconds, a token context to send
back, and descriptions of the model in Ollama's vocabulary (details, model_info, a Modelfile).
"""

from __future__ import annotations

import asyncio
import datetime
import json
from collections.abc import AsyncIterator
from typing import Any

from minicpm_server.api.errors import error_payload
from minicpm_server.api.generation import TrackedGeneration
from minicpm_server.api.ollama_protocol import ListedModel, ModelDetails, RunningModel, ShowResponse
from minicpm_server.api.responses import TokenNames, finish_reason
from minicpm_server.engine.protocol import (
    DEFAULT_REPETITION_PENALTY,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_P,
    TextDelta,
    TokenLogprob,
)
from minicpm_server.model import chat
from minicpm_server.model.facts import ModelFacts, parameter_size

ARCHITECTURE = "minicpm"  # the key prefix of model_info, as Ollama names an architecture's facts
QUANTIZATION_LEVELS = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "fp8": "FP8", "int8": "INT8"}
# The model is never unloaded while the server runs; Ollama shows such a model's expiry far ahead too.
NEVER = "9999-12-31T23:59:59Z"


def timestamp(seconds: float | None = None) -> str:
    """RFC 3339 in UTC, as Ollama writes `created_at` and `modified_at`."""
    utc = datetime.timezone.utc
    moment = datetime.datetime.now(utc) if seconds is None else datetime.datetime.fromtimestamp(seconds, utc)
    return moment.isoformat().replace("+00:00", "Z")


def _ns(seconds: float) -> int:
    return max(int(seconds * 1e9), 0)


def _line(body: dict[str, Any]) -> str:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")) + "\n"  # compact, as Ollama writes it


# --------------------------------------------------------------------------- /api/chat, /api/generate


class OllamaFormat:
    """What both generation routes share: the envelope, the final object's counts and timings, the
    log-probabilities, whole or streamed. Subclasses say where the text goes."""

    def __init__(self, model: str, names: TokenNames, logprobs: bool) -> None:
        self.model, self.names, self.logprobs = model, names, logprobs

    def content(self, text: str) -> dict[str, Any]:
        raise NotImplementedError

    async def extra(self, gen: TrackedGeneration, text: str) -> dict[str, Any]:
        """Fields the final object carries besides the counts."""
        return {}

    def _envelope(self, text: str, done: bool) -> dict[str, Any]:
        return {"model": self.model, "created_at": timestamp(), **self.content(text), "done": done}

    def loaded(self) -> dict[str, Any]:
        """The answer to a request with nothing to generate from: Ollama loads the model; ours is loaded."""
        return {**self._envelope("", True), "done_reason": "load"}

    def _stats(self, gen: TrackedGeneration, reason: str, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        """Counts, and durations measured by the server: from the request's arrival to its first
        token (tokenizing, queueing and the prompt's forward pass, which Ollama calls prompt
        evaluation), then to its last. Loading took no time: the model was loaded at start-up."""
        end = gen.finished_at or gen.started
        first = gen.first_token_at or end
        return {
            "done_reason": finish_reason(reason),
            "total_duration": _ns(end - gen.started),
            "load_duration": 0,
            "prompt_eval_count": prompt_tokens,
            "prompt_eval_duration": _ns(first - gen.started),
            "eval_count": completion_tokens,
            "eval_duration": _ns(end - first),
        }

    def _entries(self, scores: list[TokenLogprob]) -> list[dict[str, Any]]:
        def one(token_id: int, logprob: float) -> dict[str, Any]:
            return {"token": self.names.text(token_id), "logprob": logprob, "bytes": self.names.byte_list(token_id)}

        return [{**one(s.token_id, s.logprob), "top_logprobs": [one(t, v) for t, v in s.top]} for s in scores]

    async def stream(self, gen: TrackedGeneration) -> AsyncIterator[str]:
        """One object per text delta, then the final one; a failure after the stream began is an
        `{"error": ...}` line, which Ollama's clients raise."""
        try:
            async for event in gen.events():
                if isinstance(event, TextDelta):
                    piece = self._envelope(event.text, False)
                    if self.logprobs:
                        piece["logprobs"] = self._entries(event.logprobs)
                    yield _line(piece)
                    continue
                stats = self._stats(gen, event.reason, event.prompt_tokens, event.completion_tokens)
                extra = await self.extra(gen, "".join(gen.text_parts))
                yield _line({**self._envelope("", True), **stats, **extra})
        except Exception as exc:
            yield _line({"error": error_payload(exc)["message"]})

    async def whole(self, gen: TrackedGeneration) -> dict[str, Any]:
        done = await gen.complete()
        stats = self._stats(gen, done.finish_reason, done.prompt_tokens, done.completion_tokens)
        body = {**self._envelope(done.text, True), **stats, **await self.extra(gen, done.text)}
        if self.logprobs:
            body["logprobs"] = self._entries(done.logprobs)
        return body


class OllamaChatFormat(OllamaFormat):
    def content(self, text: str) -> dict[str, Any]:
        return {"message": {"role": "assistant", "content": text}}


class OllamaGenerateFormat(OllamaFormat):
    def content(self, text: str) -> dict[str, Any]:
        return {"response": text}

    async def extra(self, gen: TrackedGeneration, text: str) -> dict[str, Any]:
        """`context`: the prompt's token ids and the answer's, to send back with the next prompt.
        The answer is encoded from its text (MiniCPM's tokenizer adds no leading space), so the
        context decodes to exactly the prompt and the answer the client saw."""
        answer = await asyncio.to_thread(self.names.tokenizer.encode, text)
        return {"context": [*gen.prepared.prompt.ids, *answer[1:]]}


# --------------------------------------------------------------------------- the model routes


def details(facts: ModelFacts) -> ModelDetails:
    return ModelDetails(
        format=facts.weight_format,
        family=ARCHITECTURE,
        families=[ARCHITECTURE],
        parameter_size=parameter_size(facts.parameter_count),
        quantization_level=QUANTIZATION_LEVELS.get(facts.dtype, facts.dtype.upper()),
    )


def listed(name: str, facts: ModelFacts) -> ListedModel:
    """/api/tags: the weight files' size on disk."""
    return ListedModel(
        name=name,
        model=name,
        modified_at=timestamp(facts.modified),
        size=facts.file_bytes,
        digest=facts.digest,
        details=details(facts),
    )


def running(name: str, facts: ModelFacts, context_window: int) -> RunningModel:
    """/api/ps: the weights' size in memory, all of it on the GPU or none."""
    on_gpu = facts.memory_bytes if facts.device == "cuda" else 0
    return RunningModel(
        **listed(name, facts).model_dump(exclude={"size"}),
        size=facts.memory_bytes,
        expires_at=NEVER,
        size_vram=on_gpu,
        context_length=context_window,
    )


def model_info(facts: ModelFacts, context_window: int) -> dict[str, Any]:
    """The architecture's numbers under Ollama's keys, from config.json; the context length is the
    one the server serves (--max-model-len may cap the checkpoint's)."""
    config = facts.config
    heads = int(config["num_attention_heads"])
    return {
        "general.architecture": ARCHITECTURE,
        "general.parameter_count": facts.parameter_count,
        f"{ARCHITECTURE}.context_length": context_window,
        f"{ARCHITECTURE}.embedding_length": int(config["hidden_size"]),
        f"{ARCHITECTURE}.block_count": int(config["num_hidden_layers"]),
        f"{ARCHITECTURE}.feed_forward_length": int(config["intermediate_size"]),
        f"{ARCHITECTURE}.attention.head_count": heads,
        f"{ARCHITECTURE}.attention.head_count_kv": int(config.get("num_key_value_heads") or heads),
        f"{ARCHITECTURE}.attention.layer_norm_rms_epsilon": float(config.get("rms_norm_eps", 1e-5)),
        f"{ARCHITECTURE}.rope.freq_base": float(config.get("rope_theta", 10000.0)),
        f"{ARCHITECTURE}.vocab_size": int(config["vocab_size"]),
    }


def default_parameters(context_window: int) -> list[tuple[str, Any]]:
    """What a request that sets no options gets: the tutorial's sampling, the window, and the turn
    markers a chat answer ends at."""
    return [
        ("temperature", DEFAULT_TEMPERATURE),
        ("top_p", DEFAULT_TOP_P),
        ("repeat_penalty", DEFAULT_REPETITION_PENALTY),
        ("num_ctx", context_window),
        *(("stop", json.dumps(marker, ensure_ascii=False)) for marker in chat.TURN_MARKERS),
    ]


def show(name: str, facts: ModelFacts, context_window: int, template: str) -> ShowResponse:
    """/api/show. `template` is the chat template the server renders with (Jinja, as the checkpoint
    ships it; Ollama's own are Go templates). The Modelfile describes the model as served: this
    server builds nothing from Modelfiles."""
    parameters = default_parameters(context_window)
    modelfile = "\n".join(
        [
            f"# {name} as minicpm-server runs it (this server does not build models from Modelfiles)",
            f"FROM {name}",
            f'TEMPLATE """{template}"""',
            *(f"PARAMETER {key} {value}" for key, value in parameters),
        ]
    )
    return ShowResponse(
        modelfile=modelfile + "\n",
        parameters="\n".join(f"{key:<30} {value}" for key, value in parameters),
        template=template,
        details=details(facts),
        model_info=model_info(facts, context_window),
        capabilities=["completion"],
        modified_at=timestamp(facts.modified),
    )
