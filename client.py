"""Call the MiniCPM API server: the tutorial's get_completion(), plus a small command line.

python client.py "山东省最高的山是哪座山？"        one question
python client.py                                   multi-turn chat; history is kept
python client.py --url http://HOST:6006 "..."      another server
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator

import requests

DEFAULT_URL = "http://127.0.0.1:6006"


def _headers(api_key: str | None) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


def _payload(
    prompt: str, max_length: int | None, history: list[dict[str, str]] | None, max_new_tokens: int | None
) -> dict:
    data: dict = {"prompt": prompt}
    if max_new_tokens is not None:
        data["max_new_tokens"] = max_new_tokens
    elif max_length is not None:
        data["max_length"] = max_length
    if history:
        data["history"] = history
    return data


def get_completion(
    prompt: str,
    url: str = DEFAULT_URL,
    max_length: int | None = 512,
    history: list[dict[str, str]] | None = None,
    api_key: str | None = None,
    timeout: float = 600,
    max_new_tokens: int | None = None,
) -> str:
    """The tutorial's call: POST the prompt, return the answer text.

    max_length counts the prompt too (as model.chat does); max_new_tokens, when given, caps only
    the answer, which suits conversations whose history keeps growing.
    """
    data = _payload(prompt, max_length, history, max_new_tokens)
    response = requests.post(url, headers=_headers(api_key), data=json.dumps(data), timeout=timeout)
    if response.status_code != 200:
        raise RuntimeError(f"server answered {response.status_code}: {_error_message(response)}")
    return response.json()["response"]


def stream_completion(
    prompt: str,
    url: str = DEFAULT_URL,
    max_length: int | None = 512,
    history: list[dict[str, str]] | None = None,
    api_key: str | None = None,
    timeout: float = 600,
    max_new_tokens: int | None = None,
) -> Iterator[str]:
    """Like get_completion, but yields the answer piece by piece as the server generates it."""
    data = {**_payload(prompt, max_length, history, max_new_tokens), "stream": True}
    with requests.post(url, headers=_headers(api_key), data=json.dumps(data), stream=True, timeout=timeout) as response:
        if response.status_code != 200:
            raise RuntimeError(f"server answered {response.status_code}: {_error_message(response)}")
        for line in response.iter_lines(decode_unicode=True):
            if not line:
                continue
            chunk = json.loads(line)
            if "error" in chunk:
                raise RuntimeError(f"generation failed: {chunk['error']['message']}")
            if chunk["response"]:
                yield chunk["response"]


def _error_message(response: requests.Response) -> str:
    try:
        return response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return response.text[:200]


def _ask(
    question: str, url: str, history: list[dict[str, str]], max_new_tokens: int, api_key: str | None, stream: bool
) -> str:
    if not stream:
        answer = get_completion(question, url, None, history, api_key, max_new_tokens=max_new_tokens)
        print(f"MiniCPM> {answer}")
        return answer
    print("MiniCPM> ", end="", flush=True)
    parts = []
    for piece in stream_completion(question, url, None, history, api_key, max_new_tokens=max_new_tokens):
        parts.append(piece)
        print(piece, end="", flush=True)
    print()
    return "".join(parts)


def chat_loop(url: str, max_new_tokens: int, api_key: str | None, stream: bool = False) -> None:
    """Read questions from stdin and keep the conversation's history between turns."""
    history: list[dict[str, str]] = []
    print("Multi-turn chat. Empty line or Ctrl-D to quit; /reset starts over.")
    while True:
        try:
            question = input("你/you> ").strip()
        except EOFError:
            print()
            return
        if not question or question in ("exit", "quit"):
            return
        if question == "/reset":
            history.clear()
            continue
        try:
            answer = _ask(question, url, history, max_new_tokens, api_key, stream)
        except (RuntimeError, requests.RequestException) as exc:
            print(f"error: {exc}", file=sys.stderr)
            continue
        history += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Ask the MiniCPM API server a question.")
    parser.add_argument("prompt", nargs="?", help="the question; without it, start a multi-turn chat")
    parser.add_argument("--url", default=os.environ.get("MINICPM_URL", DEFAULT_URL), help=f"server URL ({DEFAULT_URL})")
    parser.add_argument("--max-length", type=int, default=512, help="total tokens, prompt included (512)")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="answer length cap in chat mode (512)")
    parser.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    parser.add_argument("--api-key", default=os.environ.get("MINICPM_API_KEY"), help="the server's API key, if any")
    args = parser.parse_args(argv)
    if args.prompt is None:
        chat_loop(args.url, args.max_new_tokens, args.api_key, args.stream)
        return 0
    try:
        if args.stream:
            for piece in stream_completion(args.prompt, args.url, args.max_length, api_key=args.api_key):
                print(piece, end="", flush=True)
            print()
        else:
            print(get_completion(args.prompt, args.url, args.max_length, api_key=args.api_key))
    except (RuntimeError, requests.RequestException) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
