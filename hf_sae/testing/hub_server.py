"""A local Hub for push/pull round trips with the real, unmodified ``huggingface_hub`` client over HTTP.

The write side is :class:`PushServer`: a stdlib ``http.server`` implementing the endpoints the client (2.x) calls for
``create_repo``, ``upload_folder`` / ``create_commit``, ``push_to_hub``, ``create_branch`` and ``create_tag``
(see ``shared/design/environment.md``, "A Hub you can talk to"):

    GET  /api/whoami-v2
    POST /api/repos/create                        {name, organization, type} -> {url}; 409 when it exists
    POST /api/validate-yaml                       -> {errors, warnings} (the card's YAML is really parsed)
    POST /api/models/{repo}/preupload/{rev}       -> uploadMode "regular" for every file (+ the remote blob oid)
    POST /api/models/{repo}/commit/{rev}          NDJSON lines keyed header | file | deletedFile | deletedFolder
    POST /api/models/{repo}/branch/{branch}       {startingPoint}
    POST /api/models/{repo}/tag/{rev}             {tag, message}
    GET  /api/models/{repo}[/revision/{rev}]      {id, sha, siblings, ...}
    GET  /api/models/{repo}/tree/{rev}[/{path}]   ?recursive=true
    GET  /api/models/{repo}/refs
    HEAD|GET /{repo}/resolve/{rev}/{path}         with X-Repo-Commit and ETag

Dataset repos work the same way under ``/api/datasets/...`` and ``/datasets/{repo}/resolve/...`` (``create_repo`` with
``repo_type="dataset"``), kept in ``<root>/datasets/<org>/<name>``. Errors answer 404 with
``X-Error-Code: RepoNotFound | RevisionNotFound | EntryNotFound`` like the Hub. Every commit
goes into a bare git repository ``<root>/models/<org>/<name>`` (git plumbing on a temporary index, no work tree).

The read side is ``olah`` (PyPI; in its own venv) in offline mode, serving those same git repositories, so pulls go
through a real third-party Hub implementation. :class:`LocalHub` runs both; :func:`hub_client` points the client at
one of them. No LFS, no xet: the client inlines file contents as base64 in the commit (fine for test-sized SAEs).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import yaml
from huggingface_hub import constants, hf_api
from transformers.utils import hub as transformers_hub

_GIT_ENV = {
    "GIT_AUTHOR_NAME": "hf-sae local hub",
    "GIT_AUTHOR_EMAIL": "hub@localhost",
    "GIT_COMMITTER_NAME": "hf-sae local hub",
    "GIT_COMMITTER_EMAIL": "hub@localhost",
}
_REPO_PART = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_REPO = rf"(?P<repo>{_REPO_PART}/{_REPO_PART})"


class GitStore:
    """Bare git repositories ``<root>/<kind>/<org>/<name>`` (olah's ``mirrors-path`` layout; ``kind`` is ``models``
    or ``datasets``)."""

    def __init__(self, root: str | os.PathLike, kind: str = "models"):
        self.root = Path(root)
        self.kind = kind
        (self.root / kind).mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()

    def path(self, repo_id: str) -> Path:
        return self.root / self.kind / repo_id

    def exists(self, repo_id: str) -> bool:
        return (self.path(repo_id) / "HEAD").is_file()

    def git(self, repo_id: str, *args: str, data: bytes | None = None, index: str | None = None) -> str:
        env = {**os.environ, **_GIT_ENV, "GIT_DIR": str(self.path(repo_id))}
        if index is not None:
            env["GIT_INDEX_FILE"] = index
        result = subprocess.run(["git", *args], input=data, capture_output=True, env=env, check=False)
        if result.returncode:
            raise RuntimeError(f"git {' '.join(args)} failed: {result.stderr.decode(errors='replace').strip()}")
        return result.stdout.decode()

    def create(self, repo_id: str) -> None:
        """A new repo with one commit holding ``.gitattributes``, like a repo created on the Hub."""
        self.path(repo_id).mkdir(parents=True)
        subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(self.path(repo_id))], check=True)
        self.commit(
            repo_id,
            "main",
            {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"},
            [],
            "initial commit",
        )

    def resolve(self, repo_id: str, revision: str) -> str | None:
        """A branch, tag or commit sha -> the commit sha (None if unknown)."""
        try:
            return self.git(repo_id, "rev-parse", "--verify", "--quiet", f"{revision}^{{commit}}").strip() or None
        except RuntimeError:
            return None

    def files(self, sha: str, repo_id: str) -> list[dict]:
        """Every file of a commit: path, blob oid, size."""
        out = []
        for line in self.git(repo_id, "ls-tree", "-r", "-l", "-z", sha).split("\0"):
            if line:
                meta, path = line.split("\t", 1)
                _mode, kind, oid, size = meta.split()
                if kind == "blob":
                    out.append({"path": path, "oid": oid, "size": int(size)})
        return out

    def read(self, repo_id: str, oid: str) -> bytes:
        env = {**os.environ, "GIT_DIR": str(self.path(repo_id))}
        return subprocess.run(["git", "cat-file", "blob", oid], capture_output=True, env=env, check=True).stdout

    def commit(
        self,
        repo_id: str,
        branch: str,
        additions: dict[str, bytes],
        deletions: list[str],
        message: str,
        parent_commit: str | None = None,
    ) -> str:
        """Apply additions/deletions on top of ``branch`` and move it; returns the new commit sha."""
        with self.lock, tempfile.TemporaryDirectory() as tmp:
            index = str(Path(tmp) / "index")
            parent = self.resolve(repo_id, f"refs/heads/{branch}")
            if parent_commit is not None and parent_commit != parent:
                raise ValueError(f"parentCommit {parent_commit} is not the head of {branch} ({parent})")
            self.git(repo_id, "read-tree", *([parent] if parent else ["--empty"]), index=index)
            existing = self.git(repo_id, "ls-files", "-z", index=index).split("\0") if parent else []
            for path in deletions:
                doomed = [p for p in existing if p == path or p.startswith(path.rstrip("/") + "/")]
                if not doomed:
                    raise KeyError(path)
                self.git(
                    repo_id,
                    "update-index",
                    "--force-remove",
                    "-z",
                    "--stdin",
                    data="\0".join(doomed).encode() + b"\0",
                    index=index,
                )
            lines = []
            for path, content in additions.items():
                oid = self.git(repo_id, "hash-object", "-w", "--stdin", data=content).strip()
                lines.append(f"100644 {oid}\t{path}")
            if lines:
                self.git(
                    repo_id,
                    "update-index",
                    "--add",
                    "--index-info",
                    data="\n".join(lines).encode() + b"\n",
                    index=index,
                )
            tree = self.git(repo_id, "write-tree", index=index).strip()
            sha = self.git(repo_id, "commit-tree", tree, *(["-p", parent] if parent else []), "-m", message).strip()
            self.git(repo_id, "update-ref", f"refs/heads/{branch}", sha, *([parent] if parent else []))
            return sha


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    store: GitStore  # the store of the request's repo kind (models or datasets), set by _route
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002 - quiet: the tests read .requests instead
        pass

    # ------------------------------------------------------------------------------------------- replies
    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, head: bool = False):
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, status: int, payload, headers: dict[str, str] | None = None, head: bool = False):
        self._send(status, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})}, head)

    def _error(self, status: int, code: str | None, message: str, head: bool = False):
        self._json(status, {"error": message}, {"X-Error-Code": code} if code else None, head)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    # ------------------------------------------------------------------------------------------- routing
    def do_HEAD(self):
        self._route("HEAD")

    def do_GET(self):
        self._route("GET")

    def do_POST(self):
        self._route("POST")

    def _route(self, method: str):
        url = urlsplit(self.path)
        path, query = unquote(url.path), parse_qs(url.query)
        self.server.hub.requests.append((method, path))
        head = method == "HEAD"
        try:
            for pattern, handler_method, handler in self.server.routes:
                match = re.fullmatch(pattern, path)
                if match and handler_method == ("GET" if head else method):
                    groups = match.groupdict()
                    self.store = self.server.hub.stores[groups.pop("kind", None) or "models"]
                    return handler(self, query=query, head=head, **groups)
            self._error(404, None, f"no route for {method} {path}", head)
        except Exception as err:  # a server bug must reach the test as a 500, not hang the client
            self._error(500, None, f"{type(err).__name__}: {err}", head)

    def _repo(self, repo: str, head: bool = False) -> bool:
        if not self.store.exists(repo):
            self._error(404, "RepoNotFound", f"Repository {repo} not found", head)
            return False
        return True

    def _sha(self, repo: str, revision: str, head: bool = False) -> str | None:
        sha = self.store.resolve(repo, revision)
        if sha is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head)
        return sha

    # ------------------------------------------------------------------------------------------ handlers
    def whoami(self, query, head):
        self._json(
            200,
            {
                "type": "user",
                "name": "me",
                "fullname": "Local Hub user",
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "dummy", "role": "write"}},
            },
            head=head,
        )

    def create_repo(self, query, head):
        payload = json.loads(self._body() or b"{}")
        kind = payload.get("type") or "model"
        if kind not in ("model", "dataset"):
            return self._error(400, None, "this local hub stores model and dataset repos only")
        self.store = self.server.hub.stores[f"{kind}s"]
        repo = f"{payload.get('organization') or 'me'}/{payload['name']}"
        url = f"{self.server.hub.url}/{'datasets/' if kind == 'dataset' else ''}{repo}"
        with self.server.hub.create_lock:
            if self.store.exists(repo):
                return self._json(409, {"error": "You already created this model repo", "url": url})
            self.store.create(repo)
        self._json(200, {"url": url, "name": repo})

    def validate_yaml(self, query, head):
        payload = json.loads(self._body() or b"{}")
        match = re.match(r"\s*---\n(.*?)\n---", payload.get("content", ""), flags=re.S)
        errors = []
        if match:
            try:
                yaml.safe_load(match.group(1))
            except yaml.YAMLError as err:
                errors.append({"message": f"invalid YAML metadata: {err}"})
        self._json(400 if errors else 200, {"errors": errors, "warnings": []})

    def preupload(self, repo, revision, query, head):
        if not self._repo(repo):
            return
        payload = json.loads(self._body() or b"{}")
        sha = self.store.resolve(repo, revision)
        remote = {f["path"]: f["oid"] for f in self.store.files(sha, repo)} if sha else {}
        files = [
            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": remote.get(f["path"])}
            for f in payload.get("files", [])
        ]
        self._json(200, {"files": files, "commitOid": sha})

    def commit(self, repo, revision, query, head):
        if not self._repo(repo):
            return
        body = self._body()
        hub = self.server.hub
        if hub.fail_commits is not None:
            return self._error(hub.fail_commits, None, "commit refused by the test (fail_commits is set)")
        if query.get("create_pr"):
            return self._error(400, None, "pull requests are not supported by the local hub")
        header, additions, deletions = {}, {}, []
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                if value.get("encoding", "base64") != "base64":
                    return self._error(400, None, f"unsupported encoding {value.get('encoding')!r}")
                additions[value["path"]] = base64.b64decode(value["content"])
            elif key in ("deletedFile", "deletedFolder"):
                deletions.append(value["path"])
            else:
                return self._error(400, None, f"unsupported commit operation {key!r} (the local hub has no LFS)")
        if self.store.resolve(repo, f"refs/heads/{revision}") is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision} is not a branch")
        message = header.get("summary") or "Upload"
        if header.get("description"):
            message += "\n\n" + header["description"]
        try:
            sha = self.store.commit(repo, revision, additions, deletions, message, header.get("parentCommit"))
        except KeyError as err:
            return self._error(404, "EntryNotFound", f"A file with this name doesn't exist: {err.args[0]}")
        except ValueError as err:
            return self._error(412, None, str(err))
        hub.commits.append((repo, revision, sha))
        self._json(
            200,
            {"success": True, "commitOid": sha, "commitUrl": f"{hub.url}/{repo}/commit/{sha}", "pullRequestUrl": None},
        )

    def create_branch(self, repo, branch, query, head):
        if not self._repo(repo):
            return
        payload = json.loads(self._body() or b"{}")
        store = self.store
        if store.resolve(repo, f"refs/heads/{branch}") is not None:
            return self._error(409, None, f"Branch {branch} already exists")
        sha = self._sha(repo, payload.get("startingPoint") or "main")
        if sha:
            store.git(repo, "update-ref", f"refs/heads/{branch}", sha)
            self._json(200, {})

    def create_tag(self, repo, revision, query, head):
        if not self._repo(repo):
            return
        payload = json.loads(self._body() or b"{}")
        store = self.store
        if store.resolve(repo, f"refs/tags/{payload['tag']}") is not None:
            return self._error(409, None, f"Tag {payload['tag']} already exists")
        sha = self._sha(repo, revision)
        if sha:
            store.git(repo, "tag", "-a", payload["tag"], sha, "-m", payload.get("message") or payload["tag"])
            self._json(200, {})

    def refs(self, repo, query, head):
        if not self._repo(repo, head):
            return
        out = {"branches": [], "tags": [], "converts": []}
        for line in self.store.git(
            repo, "for-each-ref", "--format=%(refname) %(objectname) %(*objectname)"
        ).splitlines():
            ref, target, peeled = (line.split(" ") + [""])[:3]
            group = "branches" if ref.startswith("refs/heads/") else "tags" if ref.startswith("refs/tags/") else None
            if group:
                name = ref.split("/", 2)[2]
                out[group].append({"name": name, "ref": ref, "targetCommit": peeled or target})
        self._json(200, out, head=head)

    def info(self, repo, query, head, revision="main"):
        if not self._repo(repo, head):
            return
        sha = self._sha(repo, revision, head)
        if sha:
            siblings = [{"rfilename": f["path"], "size": f["size"]} for f in self.store.files(sha, repo)]
            self._json(
                200,
                {
                    "id": repo,
                    "modelId": repo,
                    "sha": sha,
                    "siblings": siblings,
                    "private": False,
                    "disabled": False,
                    "gated": False,
                    "tags": [],
                    "downloads": 0,
                    "likes": 0,
                },
                head=head,
            )

    def tree(self, repo, revision, query, head, path=""):
        if not self._repo(repo, head):
            return
        sha = self._sha(repo, revision, head)
        if not sha:
            return
        prefix = path.strip("/") + "/" if path and path.strip("/") else ""
        recursive = (query.get("recursive") or ["false"])[0].lower() == "true"
        entries, folders = [], set()
        for f in self.store.files(sha, repo):
            if not f["path"].startswith(prefix):
                continue
            rest = f["path"][len(prefix) :]
            parts = rest.split("/")
            for depth in range(1, len(parts)):
                if recursive or depth == 1:
                    folders.add(prefix + "/".join(parts[:depth]))
            if recursive or len(parts) == 1:
                entries.append({"type": "file", "oid": f["oid"], "size": f["size"], "path": f["path"]})
        if prefix and not entries and not folders:
            return self._error(404, "EntryNotFound", f"{path} does not exist on {revision}", head)
        entries += [{"type": "directory", "oid": "0" * 40, "size": 0, "path": p} for p in sorted(folders)]
        self._json(200, entries, head=head)

    def resolve(self, repo, revision, path, query, head):
        if not self._repo(repo, head):
            return
        sha = self._sha(repo, revision, head)
        if not sha:
            return
        entry = next((f for f in self.store.files(sha, repo) if f["path"] == path), None)
        if entry is None:
            return self._error(404, "EntryNotFound", f"{path} does not exist on {revision}", head)
        body = b"" if head else self.store.read(repo, entry["oid"])
        headers = {"X-Repo-Commit": sha, "ETag": f'"{entry["oid"]}"', "Content-Type": "application/octet-stream"}
        self.send_response(200)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(entry["size"]))
        self.end_headers()
        if not head:
            self.wfile.write(body)


_Handler.routes = [
    (r"/api/whoami-v2", "GET", _Handler.whoami),
    (r"/api/repos/create", "POST", _Handler.create_repo),
    (r"/api/validate-yaml", "POST", _Handler.validate_yaml),
    (rf"/api/(?P<kind>models|datasets)/{_REPO}/preupload/(?P<revision>.+)", "POST", _Handler.preupload),
    (rf"/api/(?P<kind>models|datasets)/{_REPO}/commit/(?P<revision>.+)", "POST", _Handler.commit),
    (rf"/api/(?P<kind>models|datasets)/{_REPO}/branch/(?P<branch>.+)", "POST", _Handler.create_branch),
    (rf"/api/(?P<kind>models|datasets)/{_REPO}/tag/(?P<revision>.+)", "POST", _Handler.create_tag),
    (rf"/api/(?P<kind>models|datasets)/{_REPO}/refs", "GET", _Handler.refs),
    (rf"/api/(?P<kind>models|datasets)/{_REPO}/tree/(?P<revision>[^/]+)(?:/(?P<path>.*))?", "GET", _Handler.tree),
    (rf"/api/(?P<kind>models|datasets)/{_REPO}/revision/(?P<revision>.+)", "GET", _Handler.info),
    (rf"/api/(?P<kind>models|datasets)/{_REPO}", "GET", _Handler.info),
    (rf"/(?:(?P<kind>datasets)/)?{_REPO}/resolve/(?P<revision>[^/]+)/(?P<path>.+)", "GET", _Handler.resolve),
]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    hub: PushServer
    routes = _Handler.routes


class PushServer:
    """The Hub's write API (and enough of its read API for the client's push paths) over git repositories.

    Use as a context manager or call :meth:`start` / :meth:`stop`. Set ``fail_commits`` to an HTTP status to make
    every commit fail (to test that a failed push changes nothing). ``requests`` logs (method, path) of every call;
    ``commits`` logs (repo, branch, sha).
    """

    def __init__(self, root: str | os.PathLike, host: str = "127.0.0.1", port: int = 0):
        self.stores = {kind: GitStore(root, kind) for kind in ("models", "datasets")}
        self.store = self.stores["models"]  # model repos (``stores["datasets"]``: dataset repos)
        self.create_lock = threading.Lock()
        self.fail_commits: int | None = None
        self.requests: list[tuple[str, str]] = []
        self.commits: list[tuple[str, str, str]] = []
        self._httpd = _Server((host, port), _Handler)
        self._httpd.hub = self
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> PushServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hf-sae-push-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> PushServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ----------------------------------------------------------------------------------------------------- olah
def find_olah() -> str | None:
    """The ``olah-cli`` executable: ``$HF_SAE_OLAH_CLI``, ``<repo>/.venv-olah/bin/olah-cli``, or on ``PATH``."""
    candidates = [
        os.environ.get("HF_SAE_OLAH_CLI"),
        str(Path(__file__).resolve().parents[2] / ".venv-olah" / "bin" / "olah-cli"),
        shutil.which("olah-cli"),
    ]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class OlahServer:
    """``olah-cli`` in offline mode serving the git repositories under ``mirrors`` (read-only Hub API)."""

    def __init__(self, mirrors: str | os.PathLike, workdir: str | os.PathLike, olah_cli: str | None = None):
        self.olah_cli = olah_cli or find_olah()
        if self.olah_cli is None:
            raise FileNotFoundError(
                "olah-cli not found: install it with `python -m venv .venv-olah && .venv-olah/bin/pip install olah` "
                "in the repository root, or set HF_SAE_OLAH_CLI to its path."
            )
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        config = (
            f'[basic]\nhost = "127.0.0.1"\nport = {self.port}\nrepos-path = "{self.workdir / "cache"}"\n'
            f'mirrors-path = ["{Path(mirrors)}"]\nmirror-netloc = "127.0.0.1:{self.port}"\n'
            f'mirror-lfs-netloc = "127.0.0.1:{self.port}"\n\n[accessibility]\noffline = true\n'
        )
        (self.workdir / "olah.toml").write_text(config)
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> OlahServer:
        log = open(self.workdir / "olah.log", "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [self.olah_cli, "-c", "olah.toml"], cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT
        )
        self._log = log
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"olah exited with {self.process.returncode}: "
                    f"{(self.workdir / 'olah.log').read_text(errors='replace')[-2000:]}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/", timeout=1):
                    return self
            except urllib.error.HTTPError:  # any HTTP answer means it is up
                return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"olah did not answer on {self.url} within {timeout} s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if getattr(self, "_log", None) is not None:
            self._log.close()


class LocalHub:
    """A push server and olah over the same git repositories under ``root``.

    ``hub.push_url`` takes create_repo / uploads (:class:`PushServer`); ``hub.pull_url`` serves downloads (olah).
    Point the client at either with :func:`hub_client`.
    """

    def __init__(self, root: str | os.PathLike, olah_cli: str | None = None):
        self.root = Path(root)
        self.push = PushServer(self.root / "mirrors")
        self.olah = OlahServer(self.root / "mirrors", self.root / "olah", olah_cli)

    @property
    def push_url(self) -> str:
        return self.push.url

    @property
    def pull_url(self) -> str:
        return self.olah.url

    def start(self) -> LocalHub:
        self.push.start()
        try:
            self.olah.start()
        except BaseException:
            self.push.stop()
            raise
        return self

    def stop(self) -> None:
        self.olah.stop()
        self.push.stop()

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@contextlib.contextmanager
def hub_client(
    endpoint: str, cache_dir: str | os.PathLike | None = None, offline: bool = False, token: str = "hf_dummy"
) -> Iterator[None]:
    """Point the in-process ``huggingface_hub`` client at ``endpoint`` (as ``HF_ENDPOINT`` would at start-up).

    ``huggingface_hub`` reads ``HF_ENDPOINT`` / ``HF_HUB_OFFLINE`` / ``HF_HUB_CACHE`` once, at import; this sets the
    environment *and* the module constants it derived from them, and restores both on exit.
    """
    endpoint = endpoint.rstrip("/")
    env = {"HF_ENDPOINT": endpoint, "HF_TOKEN": token, "HF_HUB_OFFLINE": "1" if offline else "0"}
    if cache_dir is not None:
        env["HF_HUB_CACHE"] = str(cache_dir)
    saved_env = {key: os.environ.get(key) for key in env}
    patched = {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HUB_OFFLINE": offline,
    }
    if cache_dir is not None:
        patched["HF_HUB_CACHE"] = str(cache_dir)
    saved = {key: getattr(constants, key) for key in patched}
    saved_api_endpoint = hf_api.api.endpoint
    os.environ.update(env)
    for key, value in patched.items():
        setattr(constants, key, value)
    hf_api.api.endpoint = endpoint
    transformers_hub._hf_api = None  # transformers caches an HfApi whose endpoint is fixed when it is first made
    try:
        yield
    finally:
        for key, value in saved.items():
            setattr(constants, key, value)
        hf_api.api.endpoint = saved_api_endpoint
        transformers_hub._hf_api = None
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def main(argv: list[str] | None = None) -> None:
    """``python -m hf_sae.testing.hub_server ROOT``: run a LocalHub until interrupted, printing its two URLs."""
    parser = argparse.ArgumentParser(description="A local Hub: push server + olah over git repos under ROOT.")
    parser.add_argument("root", help="folder for the git repositories (created)")
    args = parser.parse_args(argv)

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)  # so that `kill` also stops olah
    with LocalHub(args.root) as hub:
        print(f"push: HF_ENDPOINT={hub.push_url}\npull: HF_ENDPOINT={hub.pull_url}", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
