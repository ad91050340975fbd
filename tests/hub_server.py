"""A writable Hub on 127.0.0.1: the endpoints `huggingface_hub` and transformers use to push and load models.

Files live in memory, every commit goes to `main`, and uploads are "regular" (no LFS or Xet), which is all that
`push_to_hub`, `from_pretrained`, `snapshot_download` and `pipeline(...)` need. Start it with `HubServer()` and point
`HF_ENDPOINT` at `server.endpoint` in the environment of the processes that talk to it.
"""

import base64
import gzip
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


USER = "tester"
REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"


class HubServer:
    def __init__(self):
        self.repos: dict[str, dict[str, bytes]] = {}
        self.commits: dict[str, int] = {}
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def sha(self, repo: str) -> str:
        return hashlib.sha1(f"{repo}@{self.commits.get(repo, 0)}".encode()).hexdigest()


def _handler(hub: HubServer):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep test output quiet
            pass

        def _reply(self, status: int, body=None, headers: dict | None = None, head_only: bool = False):
            data = body if isinstance(body, bytes) else json.dumps(body if body is not None else {}).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Content-Type", "application/json" if not isinstance(body, bytes) else "application/octet-stream")
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            if not head_only:
                self.wfile.write(data)

        def _body(self) -> bytes:
            data = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            return gzip.decompress(data) if self.headers.get("Content-Encoding") == "gzip" else data

        def _not_found(self, what: str, head_only=False):
            code = "RepoNotFound" if what == "repo" else "EntryNotFound"
            self._reply(404, {"error": f"{what} not found"}, {"X-Error-Code": code, "X-Error-Message": f"{what} not found"},
                        head_only=head_only)

        def do_GET(self, head_only: bool = False):
            path = unquote(urlparse(self.path).path)
            if path == "/api/whoami-v2":
                return self._reply(200, {"name": USER, "type": "user", "auth": {"accessToken": {"role": "write"}}})
            if match := re.fullmatch(rf"/api/models/{REPO}(?:/revision/[^/]+)?", path):
                repo = match["repo"]
                if repo not in hub.repos:
                    return self._not_found("repo", head_only)
                siblings = [{"rfilename": name} for name in sorted(hub.repos[repo])]
                return self._reply(200, {"id": repo, "modelId": repo, "sha": hub.sha(repo), "siblings": siblings,
                                         "private": False}, head_only=head_only)
            if match := re.fullmatch(rf"/api/models/{REPO}/tree/[^/]+(?:/(?P<folder>.*))?", path):
                repo = match["repo"]
                if repo not in hub.repos:
                    return self._not_found("repo", head_only)
                prefix = f"{match['folder'].strip('/')}/" if match["folder"] else ""
                files = [{"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                         for name, data in sorted(hub.repos[repo].items()) if name.startswith(prefix)]
                if prefix and not files:
                    return self._not_found("entry", head_only)
                return self._reply(200, files, head_only=head_only)
            if match := re.fullmatch(rf"/{REPO}/resolve/(?P<revision>[^/]+)/(?P<file>.+)", path):
                repo, name = match["repo"], match["file"]
                if repo not in hub.repos:
                    return self._not_found("repo", head_only)
                if name not in hub.repos[repo]:
                    return self._not_found("entry", head_only)
                data = hub.repos[repo][name]
                headers = {"X-Repo-Commit": hub.sha(repo), "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}
                return self._reply(200, data, headers, head_only=head_only)
            return self._reply(404, {"error": f"no route for GET {path}"})

        def do_HEAD(self):
            self.do_GET(head_only=True)

        def do_POST(self):
            path = unquote(urlparse(self.path).path)
            body = self._body()
            if path == "/api/repos/create":
                request = json.loads(body)
                name = request["name"]
                repo = name if "/" in name else f"{request.get('organization') or USER}/{name}"
                with hub.lock:
                    if repo in hub.repos:
                        return self._reply(409, {"error": "You already created this model repo", "url": repo})
                    hub.repos[repo] = {}
                return self._reply(200, {"url": f"{hub.endpoint}/{repo}", "name": repo})
            if path == "/api/validate-yaml":
                return self._reply(200, {"errors": [], "warnings": []})
            if match := re.fullmatch(rf"/api/models/{REPO}/preupload/[^/]+", path):
                files = json.loads(body)["files"]
                return self._reply(200, {"files": [{"path": file["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                   for file in files]})
            if match := re.fullmatch(rf"/api/models/{REPO}/commit/[^/]+", path):
                repo = match["repo"]
                if repo not in hub.repos:
                    return self._not_found("repo")
                with hub.lock:
                    for line in body.decode().splitlines():
                        if not line.strip():
                            continue
                        operation = json.loads(line)
                        if operation["key"] == "file":
                            value = operation["value"]
                            hub.repos[repo][value["path"]] = base64.b64decode(value["content"])
                        elif operation["key"] == "deletedFile":
                            hub.repos[repo].pop(operation["value"]["path"], None)
                    hub.commits[repo] = hub.commits.get(repo, 0) + 1
                return self._reply(200, {"commitUrl": f"{hub.endpoint}/{repo}/commit/{hub.sha(repo)}",
                                         "commitOid": hub.sha(repo), "pullRequestUrl": None})
            return self._reply(404, {"error": f"no route for POST {path}"})

    return Handler
