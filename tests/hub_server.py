"""A small Hugging Face Hub server for tests, over real HTTP on 127.0.0.1 (stdlib `http.server` in a thread).

It answers the model-repo endpoints huggingface_hub 2.4 calls: create a repo (with an initial commit holding
`.gitattributes`), repo info, YAML validation, preupload, the LFS batch/upload/verify flow, the NDJSON commit of
added files (regular base64 files and LFS files), file trees, commit lists, and `resolve/<revision>/<path>`
downloads with the headers the client checks (`X-Repo-Commit`, `ETag`, `X-Linked-Etag`, `X-Linked-Size`,
`Content-Length`) and the `X-Error-Code` of missing repos, revisions and files.

Repos are git-free: blobs are content-addressed files under `root/blobs/`, and each repo is a JSON file under
`root/repos/` with its branches and its commits, each commit a full snapshot `{path: blob info}`. Files whose name
ends with one of `LFS_SUFFIXES` are uploaded through LFS (as the Hub's default `.gitattributes` does); with
`hf_xet` installed the client picks Xet for those instead, which this server does not speak, so clients set
`HF_HUB_DISABLE_XET=1`. Repos added to `fail_commits` answer the commit endpoint with 500; `add_files` commits
without HTTP (to seed a repo); `requests` records `(method, path, authorization)` of every request and `unhandled`
the routes the server does not know.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import re
import threading
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Optional
from urllib.parse import parse_qs, unquote, urlsplit

import yaml
from huggingface_hub import ModelCardData
from huggingface_hub.utils.sha import git_hash
from typing_extensions import Self


LFS_SUFFIXES = (".safetensors", ".gguf", ".bin", ".png", ".pt")
_REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"
_REV = r"(?P<rev>[^/]+)"


class HubError(Exception):
    """An HTTP error answer, with the `X-Error-Code` huggingface_hub maps to its exception classes."""

    def __init__(self, status: int, message: str, code: Optional[str] = None, commit: Optional[str] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.commit = status, message, code, commit


class HubServer:
    """The server and its storage; use as a context manager or call `start()` / `stop()`."""

    def __init__(self, root: Path, token: Optional[str] = None) -> None:
        self.root = Path(root)
        self.token = token  # when set, the writes (`WRITES`) need `Authorization: Bearer <token>`
        self.fail_commits: set[str] = set()  # repo ids whose commit endpoint answers 500
        self.requests: list[tuple[str, str, Optional[str]]] = []
        self.unhandled: list[str] = []
        self._lock = threading.Lock()
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        (self.root / "repos").mkdir(parents=True, exist_ok=True)
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._httpd.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def start(self) -> HubServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- storage ---------------------------------------------------------------------------------------------------

    def _repo_path(self, repo_id: str) -> Path:
        return self.root / "repos" / f"{repo_id}.json"

    def load_repo(self, repo_id: str) -> dict:
        path = self._repo_path(repo_id)
        if not path.exists():
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return json.loads(path.read_text())

    def _save_repo(self, repo_id: str, repo: dict) -> None:
        path = self._repo_path(repo_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(repo, indent=1))

    def _put_blob(self, content: bytes) -> str:
        sha256 = hashlib.sha256(content).hexdigest()
        (self.root / "blobs" / sha256).write_bytes(content)
        return sha256

    def blob(self, sha256: str) -> bytes:
        return (self.root / "blobs" / sha256).read_bytes()

    def _has_blob(self, sha256: str) -> bool:
        return bool(re.fullmatch(r"[0-9a-f]{64}", sha256)) and (self.root / "blobs" / sha256).exists()

    def _file_entry(self, path: str, content: bytes) -> dict:
        return {"sha256": self._put_blob(content), "size": len(content), "git_oid": git_hash(content),
                "lfs": path.endswith(LFS_SUFFIXES) and len(content) > 0}

    def resolve(self, repo: dict, rev: str) -> dict:
        """The commit a branch name or full commit id points to."""
        oid = repo["branches"].get(rev, rev)
        commit = next((c for c in repo["commits"] if c["oid"] == oid), None)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return commit

    def _add_commit(self, repo: dict, branch: str, message: str, description: str, files: dict) -> dict:
        parent = repo["branches"].get(branch)
        date = _now()
        digest = json.dumps([parent, message, description, date, len(repo["commits"]), files], sort_keys=True)
        commit = {"oid": hashlib.sha1(digest.encode()).hexdigest(), "parent": parent, "title": message,
                  "message": description, "date": date, "files": files}
        repo["commits"].append(commit)
        repo["branches"][branch] = commit["oid"]
        return commit

    def create_repo(self, repo_id: str, private: bool) -> bool:
        """Create `repo_id` with an initial commit; False if it exists already."""
        with self._lock:
            if self._repo_path(repo_id).exists():
                return False
            repo = {"id": repo_id, "private": private, "branches": {}, "commits": [],
                    "created": _now()}
            attributes = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES).encode()
            self._add_commit(repo, "main", "initial commit", "", {".gitattributes": self._file_entry(".gitattributes",
                                                                                                     attributes)})
            self._save_repo(repo_id, repo)
            return True

    def commit(self, repo_id: str, branch: str, ndjson: bytes) -> dict:
        """Apply an NDJSON commit payload atomically; returns the new commit."""
        with self._lock:
            repo = self.load_repo(repo_id)
            if branch not in repo["branches"]:
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            files = dict(self.resolve(repo, branch)["files"])
            header: dict = {}
            for line in ndjson.splitlines():
                if not line.strip():
                    continue
                item = json.loads(line)
                key, value = item["key"], item["value"]
                if key == "header":
                    header = value
                elif key == "file":
                    if value.get("encoding") != "base64":
                        raise HubError(400, f"Unsupported encoding {value.get('encoding')!r}")
                    files[value["path"]] = self._file_entry(value["path"], base64.b64decode(value["content"]))
                elif key == "lfsFile":
                    if not self._has_blob(value["oid"]):
                        raise HubError(422, f"LFS object {value['oid']} of {value['path']} was never uploaded")
                    files[value["path"]] = {"sha256": value["oid"], "size": value["size"], "lfs": True,
                                            "git_oid": git_hash(_lfs_pointer(value["oid"], value["size"]))}
                else:
                    raise HubError(400, f"Unsupported commit operation {key!r}")
            if "summary" not in header:
                raise HubError(400, "The commit payload has no header")
            commit = self._add_commit(repo, branch, header["summary"], header.get("description", ""), files)
            self._save_repo(repo_id, repo)
            return commit

    def add_files(self, repo_id: str, files: Mapping[str, bytes], message: str = "Add files") -> str:
        """Commit `files` (path -> content) to `repo_id`, creating it if needed, without HTTP; returns its id."""
        self.create_repo(repo_id, private=False)
        with self._lock:
            repo = self.load_repo(repo_id)
            tree = {**self.resolve(repo, "main")["files"], **{p: self._file_entry(p, c) for p, c in files.items()}}
            commit = self._add_commit(repo, "main", message, "", tree)
            self._save_repo(repo_id, repo)
            return commit["oid"]

    def card_metadata(self, commit: dict) -> dict:
        """The YAML metadata of the README.md at `commit` (empty without one)."""
        entry = commit["files"].get("README.md")
        return _front_matter(self.blob(entry["sha256"]).decode()) if entry else {}


def _now() -> str:
    """The current time as the Hub writes it (ISO 8601 with milliseconds and `Z`)."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _front_matter(text: str) -> dict:
    match = re.match(r"^---\s*\n(.*?)\n---\s*\n", text, flags=re.DOTALL)
    if not match:
        return {}
    data = yaml.safe_load(match.group(1)) or {}
    if not isinstance(data, dict):
        raise TypeError("The README.md metadata must be a YAML mapping")
    return data


def _make_handler(server: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

        # -- plumbing --------------------------------------------------------------------------------------------

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        self.rfile.readline()
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _send(self, status: int, body: bytes = b"", headers: Optional[dict] = None,
                  content_type: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, data: Any, status: int = 200) -> None:
            self._send(status, json.dumps(data).encode())

        def _dispatch(self) -> None:
            url = urlsplit(self.path)
            path, query = unquote(url.path), parse_qs(url.query)
            server.requests.append((self.command, path, self.headers.get("Authorization")))
            body = self._body() if self.command in ("POST", "PUT") else b""
            try:
                for method, pattern, name in ROUTES:
                    match = re.fullmatch(pattern, path)
                    if method == self.command and match:
                        if name in WRITES and server.token is not None:
                            if self.headers.get("Authorization") != f"Bearer {server.token}":
                                raise HubError(401, "Invalid credentials in Authorization header")
                        getattr(self, name)(body=body, query=query, **match.groupdict())
                        return
                server.unhandled.append(f"{self.command} {path}")
                raise HubError(404, f"Unhandled route {self.command} {path}")
            except HubError as error:
                headers = {"X-Error-Message": error.message}
                if error.code:
                    headers["X-Error-Code"] = error.code
                if error.commit:
                    headers["X-Repo-Commit"] = error.commit
                self._send(error.status, json.dumps({"error": error.message}).encode(), headers)

        do_GET = do_HEAD = do_POST = do_PUT = _dispatch

        # -- endpoints -------------------------------------------------------------------------------------------

        def create_repo(self, body: bytes, query: dict) -> None:
            payload = json.loads(body)
            if payload.get("type", "model") != "model":
                raise HubError(400, "This test server only hosts model repos")
            repo_id = f"{payload.get('organization')}/{payload['name']}"
            if not payload.get("organization") or not re.fullmatch(_REPO, repo_id) or ".." in repo_id:
                raise HubError(400, f"Invalid repo id {repo_id!r}: give it with its namespace, e.g. 'user/name'")
            private = payload.get("visibility") == "private" or bool(payload.get("private"))
            url = f"{server.endpoint}/{repo_id}"
            if not server.create_repo(repo_id, private):
                self._json({"error": "You already created this model repo", "url": url}, status=409)
                return
            self._json({"url": url, "name": repo_id, "id": repo_id})

        def model_info(self, body: bytes, query: dict, repo: str, rev: str = "main") -> None:
            data = server.load_repo(repo)
            commit = server.resolve(data, rev)
            card = server.card_metadata(commit)
            self._json({
                "id": repo, "modelId": repo, "sha": commit["oid"], "private": data["private"],
                "createdAt": data["created"], "lastModified": commit["date"], "tags": card.get("tags", []),
                "library_name": card.get("library_name"), "cardData": card or None,
                "model-index": card.get("model-index"),
                "siblings": [{"rfilename": p, "size": f["size"], "blobId": f["git_oid"],
                              **({"lfs": {"size": f["size"], "sha256": f["sha256"], "pointerSize": 134}}
                                 if f["lfs"] else {})}
                             for p, f in sorted(commit["files"].items())],
            })

        def validate_yaml(self, body: bytes, query: dict) -> None:
            content = json.loads(body)["content"]
            try:
                ModelCardData(**_front_matter(content))  # parses `model-index` into EvalResults, raising if malformed
            except Exception as error:  # any parse failure is the client's invalid metadata
                self._json({"errors": [{"message": f"{type(error).__name__}: {error}"}], "warnings": []}, 400)
                return
            self._json({"errors": [], "warnings": []})

        def preupload(self, body: bytes, query: dict, repo: str, rev: str) -> None:
            commit = server.resolve(server.load_repo(repo), rev)
            answers = []
            for item in json.loads(body)["files"]:
                lfs = item["path"].endswith(LFS_SUFFIXES) and item["size"] > 0
                existing = commit["files"].get(item["path"])
                oid = None if existing is None else existing["sha256" if existing["lfs"] else "git_oid"]
                answers.append({"path": item["path"], "uploadMode": "lfs" if lfs else "regular",
                                "shouldIgnore": False, "oid": oid})
            self._json({"files": answers, "commitOid": commit["oid"]})

        def lfs_batch(self, body: bytes, query: dict, repo: str) -> None:
            server.load_repo(repo)
            objects = []
            for obj in json.loads(body)["objects"]:
                entry: dict = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
                if not server._has_blob(obj["oid"]):
                    href = f"{server.endpoint}/lfs/{repo}/{obj['oid']}"
                    entry["actions"] = {"upload": {"href": href}, "verify": {"href": f"{href}/verify"}}
                objects.append(entry)
            self._json({"transfer": "basic", "objects": objects, "hash_algo": "sha256"})

        def lfs_upload(self, body: bytes, query: dict, repo: str, oid: str) -> None:
            if hashlib.sha256(body).hexdigest() != oid:
                raise HubError(400, f"Uploaded content does not match LFS oid {oid}")
            server._put_blob(body)
            self._send(200)

        def lfs_verify(self, body: bytes, query: dict, repo: str, oid: str) -> None:
            if not server._has_blob(oid) or len(server.blob(oid)) != json.loads(body)["size"]:
                raise HubError(404, f"LFS object {oid} is missing or has another size")
            self._json({"success": True})

        def commit(self, body: bytes, query: dict, repo: str, rev: str) -> None:
            if repo in server.fail_commits:
                raise HubError(500, "Internal Error (simulated by the test server)")
            if query.get("create_pr"):
                raise HubError(400, "This test server does not support pull requests")
            commit = server.commit(repo, rev, body)
            self._json({"success": True, "commitOid": commit["oid"], "pullRequestUrl": None,
                        "commitUrl": f"{server.endpoint}/{repo}/commit/{commit['oid']}", "hookOutput": ""})

        def tree(self, body: bytes, query: dict, repo: str, rev: str, path: Optional[str]) -> None:
            files = server.resolve(server.load_repo(repo), rev)["files"]
            prefix = f"{path.strip('/')}/" if path and path.strip("/") else ""
            recursive = query.get("recursive", ["false"])[0].lower() == "true"
            entries, folders = [], set()
            for name, f in sorted(files.items()):
                if not name.startswith(prefix):
                    continue
                parts = name[len(prefix):].split("/")
                folders.update(prefix + "/".join(parts[: i + 1]) for i in range(len(parts) - 1 if recursive else 0))
                if len(parts) > 1 and not recursive:
                    folders.add(prefix + parts[0])
                    continue
                entry = {"type": "file", "oid": f["git_oid"], "size": f["size"], "path": name}
                if f["lfs"]:
                    entry["lfs"] = {"oid": f["sha256"], "size": f["size"], "pointerSize": 134}
                entries.append(entry)
            if prefix and not entries and not folders:
                raise HubError(404, f"{path} does not exist", "EntryNotFound")
            self._json([{"type": "directory", "oid": "0" * 40, "size": 0, "path": d} for d in sorted(folders)]
                       + entries)

        def commits(self, body: bytes, query: dict, repo: str, rev: str) -> None:
            data = server.load_repo(repo)
            by_oid = {c["oid"]: c for c in data["commits"]}
            commit: Optional[dict] = server.resolve(data, rev)
            history = []
            while commit is not None:
                history.append({"id": commit["oid"], "title": commit["title"], "message": commit["message"],
                                "authors": [{"user": "test-user"}], "date": commit["date"]})
                commit = by_oid.get(commit["parent"])
            self._json(history)

        def resolve_file(self, body: bytes, query: dict, repo: str, rev: str, path: str) -> None:
            commit = server.resolve(server.load_repo(repo), rev)
            entry = commit["files"].get(path)
            if entry is None:
                raise HubError(404, f"Entry {path} not found", "EntryNotFound", commit["oid"])
            headers = {"X-Repo-Commit": commit["oid"], "ETag": f'"{entry["git_oid"]}"'}
            if entry["lfs"]:
                headers.update({"X-Linked-Etag": f'"{entry["sha256"]}"', "X-Linked-Size": str(entry["size"])})
            self._send(200, server.blob(entry["sha256"]), headers, content_type="application/octet-stream")

    return Handler


# endpoints that need the token; LFS uploads go to the URLs the batch answer hands out, like pre-signed storage URLs
WRITES = {"create_repo", "preupload", "commit", "lfs_batch"}
ROUTES = [  # (method, path pattern, handler method); named groups become keyword arguments
    ("POST", r"/api/repos/create", "create_repo"),
    ("POST", r"/api/validate-yaml", "validate_yaml"),
    ("GET", rf"/api/models/{_REPO}", "model_info"),
    ("GET", rf"/api/models/{_REPO}/revision/{_REV}", "model_info"),
    ("POST", rf"/api/models/{_REPO}/preupload/{_REV}", "preupload"),
    ("POST", rf"/api/models/{_REPO}/commit/{_REV}", "commit"),
    ("GET", rf"/api/models/{_REPO}/tree/{_REV}(?:/(?P<path>.*))?", "tree"),
    ("GET", rf"/api/models/{_REPO}/commits/{_REV}", "commits"),
    ("POST", rf"/{_REPO}\.git/info/lfs/objects/batch", "lfs_batch"),
    ("PUT", rf"/lfs/{_REPO}/(?P<oid>[0-9a-f]{{64}})", "lfs_upload"),
    ("POST", rf"/lfs/{_REPO}/(?P<oid>[0-9a-f]{{64}})/verify", "lfs_verify"),
    ("GET", rf"/{_REPO}/resolve/{_REV}/(?P<path>.+)", "resolve_file"),
    ("HEAD", rf"/{_REPO}/resolve/{_REV}/(?P<path>.+)", "resolve_file"),
]
