"""A Hugging Face hub on loopback that serves model folders, for the download tests (no internet here).

It answers what huggingface_hub's snapshot_download asks: the model info (files and commit), then a
HEAD and a GET per file under /<repo>/resolve/<revision>/<file>. Every request is recorded.
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


class FakeHub:
    """Serves ``repos`` ({"facebook/esm2_t6_8M_UR50D": folder}) at ``url`` while open."""

    def __init__(self, repos: dict[str, Path]):
        self.repos = {repo: Path(folder) for repo, folder in repos.items()}
        self.requests: list[tuple[str, str]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                hub._answer(self, body=False)

            def do_GET(self):
                hub._answer(self, body=True)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def sha(self, repo: str) -> str:
        return hashlib.sha1(repo.encode()).hexdigest()

    def files(self, repo: str) -> list[str]:
        return sorted(p.name for p in self.repos[repo].iterdir() if p.is_file())

    def _entry(self, repo: str, name: str) -> dict:
        data = (self.repos[repo] / name).read_bytes()
        return {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}

    def _send(self, handler, status: int, data: bytes, headers: dict, body: bool) -> None:
        handler.send_response(status)
        for key, value in headers.items():
            handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        if body:
            handler.wfile.write(data)

    def _answer(self, handler, body: bool) -> None:
        path = unquote(urlparse(handler.path).path)
        self.requests.append((handler.command, path))
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"]:
            repo = "/".join(parts[2:4])
            if repo not in self.repos:
                self._send(handler, 404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"}, body)
                return
            if parts[4:5] == ["tree"]:  # the file listing snapshot_download asks for
                answer = [self._entry(repo, name) for name in self.files(repo)]
            else:
                answer = {"id": repo, "modelId": repo, "sha": self.sha(repo), "private": False,
                          "siblings": [{"rfilename": name} for name in self.files(repo)]}  # fmt: skip
            self._send(handler, 200, json.dumps(answer).encode(), {"Content-Type": "application/json"}, body)
            return
        repo, rest = "/".join(parts[:2]), parts[2:]
        if repo not in self.repos or len(rest) < 3 or rest[0] != "resolve":
            self._send(handler, 404, b"not found", {"X-Error-Code": "RepoNotFound"}, body)
            return
        file = self.repos[repo] / "/".join(rest[2:])
        if not file.is_file():
            self._send(handler, 404, b"not found", {"X-Error-Code": "EntryNotFound"}, body)
            return
        data = file.read_bytes()
        headers = {"X-Repo-Commit": self.sha(repo), "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}
        self._send(handler, 200, data, headers, body)
