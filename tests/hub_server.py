"""A small Hugging Face Hub-compatible HTTP server for offline tests (standard library only).

It implements exactly the routes that huggingface_hub 2.x calls for ``create_repo``, ``create_branch``,
``upload_folder`` (``validate-yaml``, ``preupload`` answering every file as a regular upload, then the ndjson
``commit``), ``repo_info``/``model_info``, ``list_models`` and ``snapshot_download`` (``tree`` listing and
``resolve`` HEAD/GET, plus the agent-harness registry it fetches for its user agent), with the Hub's status codes
and ``X-Error-Code`` headers, token authentication and namespace rights. Run huggingface_hub against it with
``HF_ENDPOINT=<url>`` and ``HF_HUB_DISABLE_XET=1``. Anything else answers 501 and is recorded in ``unhandled``,
so a test sees when the client needs a new route.
"""
from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

REPO = r"(?P<repo>[^/]+/[^/]+)"


def git_blob_sha(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Repo:
    repo_id: str
    private: bool
    created: str
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit sha
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit sha -> files
    messages: dict[str, str] = field(default_factory=dict)
    downloads: int = 0

    def resolve(self, revision: str) -> str | None:
        if revision in self.branches:
            return self.branches[revision]
        return revision if revision in self.commits else None


class HubState:
    """Users, tokens and repos, shared by the handler threads."""

    def __init__(self, tokens: dict[str, str], organisations: dict[str, set[str]] | None = None):
        self.tokens = dict(tokens)  # token -> user name
        self.organisations = organisations or {}
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.unhandled: list[tuple[str, str]] = []
        self.fail_with: int | None = None  # set to answer every request with this status (a Hub outage)
        self.fail_next = 0  # with fail_with: only this many requests fail (0: all), then the Hub answers again
        self.lock = threading.Lock()

    def can_write(self, user: str | None, namespace: str) -> bool:
        return user is not None and (user == namespace or user in self.organisations.get(namespace, set()))

    def commit(self, repo: Repo, branch: str, files: dict[str, bytes], message: str) -> str:
        parent = repo.branches.get(branch)
        sha = hashlib.sha1(f"{repo.repo_id}{parent}{message}{len(repo.commits)}".encode()
                           + b"".join(git_blob_sha(v).encode() for v in files.values())).hexdigest()
        repo.commits[sha] = files
        repo.messages[sha] = message
        repo.branches[branch] = sha
        return sha


class HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the Hub; every answer carries Content-Length
    state: HubState  # set on the subclass made by start_server

    def log_message(self, *args) -> None:  # quiet: tests read state.requests instead
        pass

    # -- plumbing -------------------------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def user(self) -> tuple[str | None, bool]:
        """(user, token was sent): an unknown token is an error, no token is anonymous."""
        header = self.headers.get("Authorization", "")
        if not header.startswith("Bearer "):
            return None, False
        return self.state.tokens.get(header[len("Bearer "):]), True

    def body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def send(self, status: int, payload=None, headers: dict[str, str] | None = None, raw: bytes | None = None,
             head: bool = False) -> None:
        data = raw if raw is not None else json.dumps(payload if payload is not None else {}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream" if raw is not None else "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if not head:
            self.wfile.write(data)

    def error(self, status: int, message: str, code: str | None = None, head: bool = False) -> None:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self.send(status, {"error": message}, headers, head=head)

    def route(self, method: str) -> None:
        parts = urlsplit(self.path)
        path, query = unquote(parts.path), parse_qs(parts.query)
        with self.state.lock:
            self.state.requests.append((method, path))
        if self.state.fail_with is not None:
            status = self.state.fail_with
            with self.state.lock:
                if self.state.fail_next:
                    self.state.fail_next -= 1
                    if not self.state.fail_next:
                        self.state.fail_with = None  # the last failure: the next request is answered
            self.body()
            return self.error(status, "test hub: simulated failure", head=method == "HEAD")  # no body on a HEAD
        for pattern_method, pattern, handler in ROUTES:
            if pattern_method == method and (match := re.fullmatch(pattern, path)):
                self.body_bytes = self.body() if method == "POST" else b""
                with self.state.lock:
                    return handler(self, query=query, **match.groupdict())
        with self.state.lock:
            self.state.unhandled.append((method, path))
        self.body()
        self.error(501, f"test hub: no route for {method} {path}")

    def do_GET(self):
        self.route("GET")

    def do_HEAD(self):
        self.route("HEAD")

    def do_POST(self):
        self.route("POST")

    # -- repo access ----------------------------------------------------------------------------------------
    def readable(self, repo_id: str, head: bool = False) -> Repo | None:
        user, sent = self.user()
        if sent and user is None:
            self.error(401, "Invalid credentials in Authorization header", head=head)
            return None
        repo = self.state.repos.get(repo_id)
        if repo is None or (repo.private and not self.state.can_write(user, repo_id.split("/")[0])):
            self.error(404 if not sent else 401, "Repository not found", "RepoNotFound", head=head)
            return None
        return repo

    def writable(self, repo_id: str) -> Repo | None:
        user, sent = self.user()
        if user is None:
            self.error(401, "Invalid credentials in Authorization header" if sent else "Authorization required")
            return None
        repo = self.readable(repo_id)
        if repo is None:
            return None
        if not self.state.can_write(user, repo_id.split("/")[0]):
            self.error(403, f"You don't have the rights to write to {repo_id}")
            return None
        return repo

    # -- routes ---------------------------------------------------------------------------------------------
    def create_repo(self, query) -> None:
        user, sent = self.user()
        if user is None:
            return self.error(401, "Invalid credentials in Authorization header" if sent else "Authorization required")
        payload = json.loads(self.body_bytes or b"{}")
        namespace = payload.get("organization") or user
        repo_id = f"{namespace}/{payload['name']}"
        if payload.get("type", "model") != "model":
            return self.error(400, "test hub serves model repos only")
        if not self.state.can_write(user, namespace):
            return self.error(403, f"You don't have the rights to create a model under the namespace \"{namespace}\"")
        if repo_id in self.state.repos:
            return self.send(409, {"error": "You already created this model repo", "url": f"{self.base_url}/{repo_id}"})
        now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        repo = Repo(repo_id, payload.get("visibility") == "private" or bool(payload.get("private")), now)
        self.state.commit(repo, "main", {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"},
                          "initial commit")
        self.state.repos[repo_id] = repo
        self.send(200, {"url": f"{self.base_url}/{repo_id}", "name": repo_id, "id": repo_id})

    def validate_yaml(self, query) -> None:
        import yaml

        content = json.loads(self.body_bytes or b"{}").get("content", "")
        match = re.match(r"^---\s*\n(.*?)\n---\s*\n", content, re.DOTALL)
        try:
            metadata = yaml.safe_load(match.group(1)) if match else None
        except yaml.YAMLError as exc:
            return self.send(400, {"errors": [{"message": f"invalid YAML: {exc}"}]})
        if metadata is not None and not isinstance(metadata, dict):
            return self.send(400, {"errors": [{"message": "metadata must be a mapping"}]})
        warnings = [] if metadata else [{"message": "empty or missing yaml metadata in repo card"}]
        self.send(200, {"errors": [], "warnings": warnings})

    def create_branch(self, query, repo, branch) -> None:
        target = self.writable(repo)
        if target is None:
            return
        if branch in target.branches:
            return self.error(409, f"Reference refs/heads/{branch} already exists")
        start = json.loads(self.body_bytes or b"{}").get("startingPoint") or "main"
        sha = target.resolve(start)
        if sha is None:
            return self.error(404, f"Invalid rev id: {start}", "RevisionNotFound")
        target.branches[branch] = sha
        self.send(200, {})

    def preupload(self, query, repo, revision) -> None:
        target = self.writable(repo)
        if target is None:
            return
        sha = target.resolve(revision)
        existing = target.commits[sha] if sha else {}
        files = json.loads(self.body_bytes)["files"]
        self.send(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                                   "oid": git_blob_sha(existing[f["path"]]) if f["path"] in existing else None}
                                  for f in files], "commitOid": sha})

    def commit(self, query, repo, revision) -> None:
        target = self.writable(repo)
        if target is None:
            return
        sha = target.resolve(revision)
        if sha is None or revision not in target.branches:
            return self.error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        files = dict(target.commits[sha])
        message = ""
        for line in self.body_bytes.splitlines():
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                message = value["summary"]
            elif key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                files = {p: c for p, c in files.items() if not p.startswith(value["path"].rstrip("/") + "/")}
            else:  # lfsFile: never offered by preupload here
                return self.error(400, f"test hub: unsupported commit operation {key}")
        if query.get("create_pr") == ["1"]:  # a pull request: a new refs/pr/N branch from the revision
            number = 1 + sum(branch.startswith("refs/pr/") for branch in target.branches)
            target.branches[f"refs/pr/{number}"] = sha
            new = self.state.commit(target, f"refs/pr/{number}", files, message)
            return self.send(200, {"success": True, "commitOid": new,
                                   "commitUrl": f"{self.base_url}/{repo}/commit/{new}",
                                   "pullRequestUrl": f"{self.base_url}/{repo}/discussions/{number}"})
        new = self.state.commit(target, revision, files, message)
        self.send(200, {"success": True, "commitOid": new, "commitUrl": f"{self.base_url}/{repo}/commit/{new}"})

    def model_info_payload(self, repo: Repo, sha: str, card_data: bool = False) -> dict:
        files = repo.commits[sha]
        info = {"id": repo.repo_id, "modelId": repo.repo_id, "author": repo.repo_id.split("/")[0], "sha": sha,
                "private": repo.private, "downloads": repo.downloads, "likes": 0, "createdAt": repo.created,
                "lastModified": repo.created, "siblings": [{"rfilename": p} for p in sorted(files)]}
        metadata = card_metadata(files.get("README.md", b""))
        info["tags"] = list(metadata.get("tags") or [])
        if metadata.get("library_name"):
            info["library_name"] = metadata["library_name"]
        if card_data:
            info["cardData"] = metadata
        return info

    def readable_revision(self, repo, revision, head: bool = False):
        """(repo, commit sha) when the caller may read that revision; else the error is sent and None returned."""
        target = self.readable(repo, head=head)
        if target is None:
            return None
        sha = target.resolve(revision)
        if sha is None:
            self.error(404, f"Invalid rev id: {revision}", "RevisionNotFound", head=head)
            return None
        return target, sha

    def model_info(self, query, repo, revision="main") -> None:
        found = self.readable_revision(repo, revision)
        if found is not None:
            self.send(200, self.model_info_payload(*found, card_data=True))

    def tree(self, query, repo, revision, path=None) -> None:
        found = self.readable_revision(repo, revision)
        if found is None:
            return
        target, sha = found
        prefix = f"{path.strip('/')}/" if path else ""  # None when the route has no path part
        entries = [{"type": "file", "path": p, "size": len(c), "oid": git_blob_sha(c)}
                   for p, c in sorted(target.commits[sha].items()) if p.startswith(prefix)]
        self.send(200, entries)

    def resolve_file(self, query, repo, revision, path, head: bool = False) -> None:
        found = self.readable_revision(repo, revision, head=head)
        if found is None:
            return
        target, sha = found
        content = target.commits[sha].get(path)
        if content is None:
            return self.error(404, "Entry not found", "EntryNotFound", head=head)
        if not head and path == "config.json":
            target.downloads += 1  # the Hub counts a download per config.json fetch
        self.send(200, raw=content, head=head, headers={"X-Repo-Commit": sha, "ETag": f'"{git_blob_sha(content)}"'})

    def resolve_head(self, query, repo, revision, path) -> None:
        self.resolve_file(query, repo, revision, path, head=True)

    def list_models(self, query) -> None:
        user, sent = self.user()
        if sent and user is None:
            return self.error(401, "Invalid credentials in Authorization header")
        wanted = set(query.get("filter", []))
        search = (query.get("search") or [""])[0].lower()
        author = (query.get("author") or [None])[0]
        card_data = bool(query.get("cardData")) or bool(query.get("full"))
        results = []
        for repo in self.state.repos.values():
            if repo.private and not self.state.can_write(user, repo.repo_id.split("/")[0]):
                continue
            info = self.model_info_payload(repo, repo.branches["main"], card_data=card_data)
            if wanted - set(info["tags"]) or search not in repo.repo_id.lower():
                continue
            if author and info["author"] != author:
                continue
            if not card_data:
                info.pop("siblings")
            results.append(info)
        limit = int((query.get("limit") or [0])[0] or 0)
        self.send(200, results[:limit] if limit else results)


    def agent_harnesses(self, query) -> None:
        # huggingface_hub's best-effort user-agent detection fetches this registry; an empty one detects nothing
        self.send(200, {"standardEnvVars": [], "harnesses": {}})


def card_metadata(readme: bytes) -> dict:
    import yaml

    match = re.match(r"^---\s*\n(.*?)\n---\s*\n", readme.decode("utf-8", "replace"), re.DOTALL)
    return (yaml.safe_load(match.group(1)) or {}) if match else {}


ROUTES = [
    ("POST", r"/api/repos/create", HubHandler.create_repo),
    ("POST", r"/api/validate-yaml", HubHandler.validate_yaml),
    ("POST", rf"/api/models/{REPO}/branch/(?P<branch>[^/]+)", HubHandler.create_branch),
    ("POST", rf"/api/models/{REPO}/preupload/(?P<revision>[^/]+)", HubHandler.preupload),
    ("POST", rf"/api/models/{REPO}/commit/(?P<revision>[^/]+)", HubHandler.commit),
    ("GET", r"/api/agent-harnesses", HubHandler.agent_harnesses),
    ("GET", r"/api/models", HubHandler.list_models),
    ("GET", rf"/api/models/{REPO}/revision/(?P<revision>[^/]+)", HubHandler.model_info),
    ("GET", rf"/api/models/{REPO}/tree/(?P<revision>[^/]+)(?:/(?P<path>.*))?", HubHandler.tree),
    ("GET", rf"/api/models/{REPO}", HubHandler.model_info),
    ("HEAD", rf"/{REPO}/resolve/(?P<revision>[^/]+)/(?P<path>.+)", HubHandler.resolve_head),
    ("GET", rf"/{REPO}/resolve/(?P<revision>[^/]+)/(?P<path>.+)", HubHandler.resolve_file),
]


class TestHub:
    """A running server: ``url``, ``state``; ``close()`` stops it."""

    __test__ = False  # a helper, not a test class

    def __init__(self, tokens: dict[str, str], organisations: dict[str, set[str]] | None = None):
        self.state = HubState(tokens, organisations)
        handler = type("BoundHubHandler", (HubHandler,), {"state": self.state})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)  # port 0: a free random port
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
