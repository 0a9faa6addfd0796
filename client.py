"""Call the MiniCPM API server: the tutorial's get_completion(), plus a small command line.

python client.py "山东省最高的山是哪座山？"        one question
python client.py                                   multi-turn chat; history is kept (the oldest turns
                                                   are dropped when it outgrows the context window)
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
# The error code the server gives a request that does not fit the model's context window.
CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"


class ServerError(RuntimeError):
    """The server answered with an error status; `code` is the error's code when it gave one."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(f"server answered {status}: {message}")
        self.status = status
        self.code = code


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


def _check(response: requests.Response) -> None:
    """Raise ServerError, with the server's own message and code, unless the answer is a 200."""
    if response.status_code == 200:
        return
    message, code = response.text[:200], None
    try:
        error = response.json()["error"]
        message, code = error["message"], error.get("code")
    except (ValueError, KeyError, TypeError):
        pass
    raise ServerError(response.status_code, message, code)


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
    the answer, which suits conversations whose history keeps growing. With neither, the server
    answers in whatever room the context window has left. Errors raise ServerError (a RuntimeError).
    """
    data = _payload(prompt, max_length, history, max_new_tokens)
    response = requests.post(url, headers=_headers(api_key), data=json.dumps(data), timeout=timeout)
    _check(response)
    return response.json()["response"]


def _open_stream(
    prompt: str,
    url: str,
    max_length: int | None,
    history: list[dict[str, str]] | None,
    api_key: str | None,
    timeout: float,
    max_new_tokens: int | None,
) -> requests.Response:
    """Start a streamed answer; a request the server refuses raises before any text arrives."""
    data = {**_payload(prompt, max_length, history, max_new_tokens), "stream": True}
    response = requests.post(url, headers=_headers(api_key), data=json.dumps(data), stream=True, timeout=timeout)
    try:
        _check(response)
    except ServerError:
        response.close()
        raise
    return response


def _pieces(response: requests.Response) -> Iterator[str]:
    with response:
        for line in response.iter_lines(decode_unicode=True):
            if not line:
                continue
            chunk = json.loads(line)
            if "error" in chunk:
                raise RuntimeError(f"generation failed: {chunk['error']['message']}")
            if chunk["response"]:
                yield chunk["response"]


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
    yield from _pieces(_open_stream(prompt, url, max_length, history, api_key, timeout, max_new_tokens))


def context_window(url: str, timeout: float = 10) -> int | None:
    """The model's context window in tokens, from GET /ui/config (no API key needed); None when the
    server does not say (still loading, or an older server). Raises requests.ConnectionError when
    nothing answers at `url`."""
    try:
        response = requests.get(url.rstrip("/") + "/ui/config", timeout=timeout)
        return int(response.json()["context_window"])
    except requests.ConnectionError:
        raise
    except (requests.RequestException, ValueError, KeyError, TypeError):
        return None


def _unreachable(url: str) -> str:
    return f"error: cannot reach the server at {url} (is `python api.py` running?)"


def _dim(text: str) -> str:
    """Faint text on a terminal that shows colours; plain text anywhere else."""
    plain = not sys.stderr.isatty() or os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb"
    return text if plain else f"\033[2m{text}\033[0m"


def _dropped_notice(turns: int, window: int | None) -> str:
    which = "the oldest turn" if turns == 1 else f"the {turns} oldest turns"
    fit = f"the {window}-token context window" if window else "the context window"
    return f"(dropped {which} to fit {fit})"


class Conversation:
    """A multi-turn chat with the server. History is kept between turns; when the next request would
    not fit the context window, the oldest user+assistant turns are dropped until it does (the user
    is told), so a long conversation never dead-ends."""

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        max_new_tokens: int | None = None,
        max_length: int | None = None,
        stream: bool = False,
        window: int | None = None,
    ) -> None:
        self.url = url
        self.api_key = api_key
        self.max_new_tokens = max_new_tokens
        self.max_length = max_length
        self.stream = stream
        self.window = window
        self.history: list[dict[str, str]] = []

    def ask(self, question: str) -> str:
        """Print the answer (as it is generated, with stream) and return it. On an error the
        history is left as it was, so the next question still carries the conversation."""
        kept = self.history
        while True:
            try:
                response = self._send(question, kept)
                break
            except ServerError as exc:
                if exc.code != CONTEXT_LENGTH_EXCEEDED or len(kept) < 2:
                    raise  # only the new question is left, and even that does not fit: the server says why
                kept = kept[2:]  # the oldest user message and its answer
        dropped = (len(self.history) - len(kept)) // 2
        if dropped:
            if self.window is None:
                self.window = context_window(self.url)
            print(_dim(_dropped_notice(dropped, self.window)), file=sys.stderr, flush=True)
        self.history = kept
        answer = self._print_answer(response)
        self.history = [*kept, {"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        return answer

    def reset(self) -> None:
        self.history = []

    def _send(self, question: str, history: list[dict[str, str]]) -> requests.Response:
        if self.stream:
            return _open_stream(question, self.url, self.max_length, history, self.api_key, 600, self.max_new_tokens)
        data = _payload(question, self.max_length, history, self.max_new_tokens)
        response = requests.post(self.url, headers=_headers(self.api_key), data=json.dumps(data), timeout=600)
        _check(response)
        return response

    def _print_answer(self, response: requests.Response) -> str:
        if not self.stream:
            answer = response.json()["response"]
            print(f"MiniCPM> {answer}", flush=True)
            return answer
        print("MiniCPM> ", end="", flush=True)
        parts = []
        for piece in _pieces(response):
            parts.append(piece)
            print(piece, end="", flush=True)
        print(flush=True)
        return "".join(parts)


def chat_loop(
    url: str,
    max_new_tokens: int | None = None,
    api_key: str | None = None,
    stream: bool = False,
    max_length: int | None = None,
) -> int:
    """Read questions from stdin and keep the conversation's history between turns."""
    try:
        window = context_window(url)
    except requests.ConnectionError:
        print(_unreachable(url), file=sys.stderr)
        return 1
    chat = Conversation(url, api_key, max_new_tokens, max_length, stream, window)
    print("Multi-turn chat. Empty line or Ctrl-D to quit; /reset starts over.", flush=True)
    while True:
        try:
            question = input("你/you> ").strip()
        except EOFError:
            print()
            return 0
        if not question or question in ("exit", "quit"):
            return 0
        if question == "/reset":
            chat.reset()
            continue
        try:
            chat.ask(question)
        except requests.ConnectionError:
            print(_unreachable(url), file=sys.stderr)  # the history is kept: start the server and ask again
        except (RuntimeError, requests.RequestException) as exc:
            print(f"error: {exc}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Ask the MiniCPM API server a question.")
    parser.add_argument("prompt", nargs="?", help="the question; without it, start a multi-turn chat")
    parser.add_argument("--url", default=os.environ.get("MINICPM_URL", DEFAULT_URL), help=f"server URL ({DEFAULT_URL})")
    parser.add_argument(
        "--max-length", type=int, help="total tokens, prompt (and history) included (default: the whole context window)"
    )
    parser.add_argument(
        "--max-new-tokens", type=int, help="answer length cap (default: what the context window has left)"
    )
    parser.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    parser.add_argument("--api-key", default=os.environ.get("MINICPM_API_KEY"), help="the server's API key, if any")
    args = parser.parse_args(argv)
    if args.prompt is None:
        return chat_loop(args.url, args.max_new_tokens, args.api_key, args.stream, args.max_length)
    try:
        if args.stream:
            for piece in stream_completion(
                args.prompt, args.url, args.max_length, api_key=args.api_key, max_new_tokens=args.max_new_tokens
            ):
                print(piece, end="", flush=True)
            print()
        else:
            print(
                get_completion(
                    args.prompt, args.url, args.max_length, api_key=args.api_key, max_new_tokens=args.max_new_tokens
                )
            )
    except requests.ConnectionError:
        print(_unreachable(args.url), file=sys.stderr)
        return 1
    except (RuntimeError, requests.RequestException) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def run(argv: list[str] | None = None) -> int:
    """main(), ending quietly when the reader of our output goes away (`python client.py ... | head -1`)
    or on Ctrl-C."""
    try:
        status = main(argv)
        sys.stdout.flush()  # output still buffered for a pipe meets a closed pipe here
        return status
    except BrokenPipeError:
        # Nobody reads stdout any more: stop as Unix tools do, without a traceback. Point stdout at
        # /dev/null so the interpreter's own flush at exit does not hit the closed pipe again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(run())
