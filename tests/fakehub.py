"""A small ModelScope-compatible hub on loopback, serving a local directory to the real client.

Routes (what modelscope's snapshot_download calls):
  GET /api/v1/models/{owner}/{name}/repo/files?Revision=..&Recursive=..   the file list, with Sha256 and Size
  GET /api/v1/models/{owner}/{name}/repo?Revision=..&FilePath=..          one file; honours Range
Anything else answers 404 in ModelScope's JSON error shape. `requests` records every path asked for.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
import urllib.parse
from pathlib import Path


class FakeModelScopeHub:
    def __init__(self, models: dict[str, Path]) -> None:
        self.models = models  # "Owner/Name" -> directory
        self.requests: list[str] = []
        self.cut_after: dict[str, int] = {}  # FilePath -> bytes to send before dropping the connection once
        self.corrupt: set[str] = set()  # FilePaths served with a flipped byte (the listing keeps the true sha256)
        self.ranges: list[tuple[str, str]] = []  # (FilePath, Range header) of ranged requests
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                hub.requests.append(self.path)
                hub.route(self)

            def log_message(self, *args) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_port}"

    def __enter__(self) -> FakeModelScopeHub:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    # ------------------------------------------------------------------ routing

    def route(self, req: http.server.BaseHTTPRequestHandler) -> None:
        parsed = urllib.parse.urlparse(req.path)
        query = dict(urllib.parse.parse_qsl(parsed.query))
        parts = parsed.path.strip("/").split("/")
        if len(parts) == 7 and parts[:3] == ["api", "v1", "models"] and parts[5:] == ["repo", "files"]:
            return self._files(req, f"{parts[3]}/{parts[4]}")
        if len(parts) == 6 and parts[:3] == ["api", "v1", "models"] and parts[5] == "repo" and "FilePath" in query:
            return self._file(req, f"{parts[3]}/{parts[4]}", query["FilePath"])
        self.send_json(req, 404, {"Code": 404, "Message": f"not found: {parsed.path}", "Success": False})

    def _files(self, req, model_id: str) -> None:
        root = self.models.get(model_id)
        if root is None:
            return self.send_json(
                req, 404, {"Code": 10010205001, "Message": f"model {model_id} not found", "Success": False}
            )
        files = []
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            rel = path.relative_to(root).as_posix()
            data = path.read_bytes()
            files.append(
                {
                    "Name": path.name,
                    "Path": rel,
                    "Type": "blob",
                    "Size": len(data),
                    "Sha256": hashlib.sha256(data).hexdigest(),
                    "Revision": "0" * 40,
                }
            )
        self.send_json(req, 200, {"Code": 200, "Data": {"Files": files}, "Message": "success", "Success": True})

    def _file(self, req, model_id: str, file_path: str) -> None:
        root = self.models.get(model_id)
        target = (root / file_path) if root else None
        if target is None or not target.is_file():
            return self.send_json(req, 404, {"Code": 404, "Message": f"file {file_path} not found", "Success": False})
        data = target.read_bytes()
        if file_path in self.corrupt:
            data = data[:-1] + bytes([data[-1] ^ 0xFF])
        start = 0
        range_header = req.headers.get("Range")
        if range_header and range_header.startswith("bytes="):
            self.ranges.append((file_path, range_header))
            start = int(range_header.split("=", 1)[1].split("-", 1)[0] or 0)
        body = data[start:]
        req.send_response(206 if start else 200)
        req.send_header("Content-Type", "application/octet-stream")
        req.send_header("Content-Length", str(len(body)))
        if start:
            req.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        req.end_headers()
        cut = self.cut_after.pop(file_path, None)
        if cut is not None:
            req.wfile.write(body[:cut])
            req.wfile.flush()
            req.close_connection = True
            req.connection.shutdown(2)
            return
        req.wfile.write(body)

    @staticmethod
    def send_json(req, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        req.send_response(status)
        req.send_header("Content-Type", "application/json")
        req.send_header("Content-Length", str(len(body)))
        req.end_headers()
        req.wfile.write(body)


class FakeHuggingFaceHub:
    """A Hugging Face endpoint on loopback (HF_ENDPOINT) serving local directories to huggingface_hub.

    Routes: GET /api/models/{owner}/{name}/revision/{rev}[?blobs=true] (the file list, with sizes and,
    for weights, LFS sha256), and HEAD/GET /{owner}/{name}/resolve/{rev}/{path} (one file, with Range).
    """

    COMMIT = "0123456789abcdef0123456789abcdef01234567"
    LFS_SUFFIXES = (".bin", ".safetensors", ".model")

    def __init__(self, models: dict[str, Path]) -> None:
        self.models = models
        self.requests: list[str] = []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                hub.requests.append("GET " + self.path)
                hub.route(self, head=False)

            def do_HEAD(self) -> None:
                hub.requests.append("HEAD " + self.path)
                hub.route(self, head=True)

            def log_message(self, *args) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_port}"

    def __enter__(self) -> FakeHuggingFaceHub:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def route(self, req, head: bool) -> None:
        parsed = urllib.parse.urlparse(req.path)
        parts = [urllib.parse.unquote(p) for p in parsed.path.strip("/").split("/")]
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "tree":
            return self._tree(req, f"{parts[2]}/{parts[3]}")
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            return self._info(req, f"{parts[2]}/{parts[3]}")
        if len(parts) >= 5 and parts[2] == "resolve":
            return self._file(req, f"{parts[0]}/{parts[1]}", "/".join(parts[4:]), head)
        FakeModelScopeHub.send_json(req, 404, {"error": "not found"})

    def _files(self, root: Path) -> list[Path]:
        return sorted(p for p in root.rglob("*") if p.is_file())

    def _info(self, req, repo: str) -> None:
        root = self.models.get(repo)
        if root is None:
            req.send_response(404)
            req.send_header("X-Error-Code", "RepoNotFound")
            req.send_header("Content-Type", "application/json")
            body = json.dumps({"error": "Repository not found"}).encode()
            req.send_header("Content-Length", str(len(body)))
            req.end_headers()
            req.wfile.write(body)
            return
        siblings = []
        for path in self._files(root):
            data = path.read_bytes()
            entry = {"rfilename": path.relative_to(root).as_posix(), "size": len(data), "blobId": _git_blob_sha1(data)}
            if path.suffix in self.LFS_SUFFIXES:
                entry["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            siblings.append(entry)
        FakeModelScopeHub.send_json(
            req, 200, {"id": repo, "modelId": repo, "sha": self.COMMIT, "siblings": siblings, "private": False}
        )

    def _tree(self, req, repo: str) -> None:
        root = self.models.get(repo)
        if root is None:
            return self._info(req, repo)  # the same 404
        entries = []
        for path in self._files(root):
            data = path.read_bytes()
            entry = {
                "type": "file",
                "path": path.relative_to(root).as_posix(),
                "size": len(data),
                "oid": _git_blob_sha1(data),
            }
            if path.suffix in self.LFS_SUFFIXES:
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            entries.append(entry)
        body = json.dumps(entries).encode()
        req.send_response(200)
        req.send_header("Content-Type", "application/json")
        req.send_header("Content-Length", str(len(body)))
        req.end_headers()
        req.wfile.write(body)

    def _file(self, req, repo: str, file_path: str, head: bool) -> None:
        root = self.models.get(repo)
        target = root / file_path if root else None
        if target is None or not target.is_file():
            req.send_response(404)
            req.send_header("X-Error-Code", "EntryNotFound")
            req.send_header("Content-Length", "0")
            req.end_headers()
            return
        data = target.read_bytes()
        etag = hashlib.sha256(data).hexdigest() if target.suffix in self.LFS_SUFFIXES else _git_blob_sha1(data)
        start = 0
        range_header = req.headers.get("Range")
        if range_header and range_header.startswith("bytes="):
            start = int(range_header.split("=", 1)[1].split("-", 1)[0] or 0)
        body = data[start:]
        req.send_response(206 if start else 200)
        req.send_header("Content-Type", "application/octet-stream")
        req.send_header("Content-Length", str(len(body)))
        req.send_header("ETag", f'"{etag}"')
        req.send_header("X-Repo-Commit", self.COMMIT)
        if target.suffix in self.LFS_SUFFIXES:
            req.send_header("X-Linked-Etag", f'"{etag}"')
            req.send_header("X-Linked-Size", str(len(data)))
        if start:
            req.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        req.end_headers()
        if not head:
            req.wfile.write(body)


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
