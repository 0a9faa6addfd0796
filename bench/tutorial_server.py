"""The baseline: a server built the tutorial's way, for measuring against in the same run.

One FastAPI handler that runs the model itself, blocking the event loop (so requests go one at
a time), with the tutorial's sampling and its GPU cache clean-up after every request. The
checkpoint's own model.chat no longer runs on current transformers, so the model comes from our
loader and generation from transformers' generate(); what matters here is the serving design.
Exactly `max_new_tokens` are generated when `ignore_eos` is set, so both servers do equal work.

    python -m bench.tutorial_server --model-path DIR --port 6100 [--device cpu]
"""

from __future__ import annotations

import argparse
import datetime

import torch
import uvicorn
from fastapi import FastAPI, Request

from minicpm_server.model import chat
from minicpm_server.model.checkpoint import load_checkpoint


def build_app(model_path: str, device: str) -> FastAPI:
    # the tutorial's server calls transformers' generate(): transformers' Granite classes
    loaded = load_checkpoint(model_path, device=device, implementation="transformers")
    model, tokenizer = loaded.model, loaded.tokenizer
    app = FastAPI()

    def torch_gc() -> None:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.ipc_collect()

    @app.post("/")
    async def create_item(request: Request) -> dict:
        body = await request.json()
        prompt = body.get("prompt")
        ids = tokenizer.encode(chat.render_chat(tokenizer, chat.conversation(prompt)))
        new = int(body.get("max_new_tokens", 48))
        with torch.inference_mode():
            out = model.generate(
                torch.tensor([ids], device=loaded.device),
                max_new_tokens=new,
                min_new_tokens=new if body.get("ignore_eos") else 0,
                do_sample=True,
                temperature=0.5,
                top_p=0.8,
                repetition_penalty=1.02,
            )
        text = tokenizer.decode(out[0, len(ids) :].tolist())
        torch_gc()
        return {"response": text, "status": 200, "time": datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--port", type=int, default=6100)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    torch.manual_seed(0)
    uvicorn.run(build_app(args.model_path, args.device), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
