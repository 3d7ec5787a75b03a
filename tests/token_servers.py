"""Token servers on 127.0.0.1 for the tests: LUCI local auth, the GCE metadata server, OAuth.

Each answers the way the real one does (see the modules of
``cipdplugin/backend/``), records what it was sent, and plays queued faults
("500", "slow", "error", ...) one per request before answering normally.
"""

from __future__ import annotations

import base64
import json
import threading
import time
import urllib.parse
from collections import deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

ServerT = TypeVar("ServerT", bound="TokenServer")


@dataclass(frozen=True)
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Any

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.server.owner._handle(self)

    def do_POST(self) -> None:
        self.server.owner._handle(self)


class _Server(ThreadingHTTPServer):
    daemon_threads = True


class TokenServer:
    """The common part: a thread serving HTTP, what it received, and faults to play."""

    def __init__(self) -> None:
        self.stopping = threading.Event()
        # Guards the fields below; handler threads and the test share them.
        self._lock = threading.Lock()
        self._received: list[Received] = []
        self._faults: deque[str] = deque()
        self.server = _Server(("127.0.0.1", 0), _Handler)
        self.server.owner = self  # type: ignore[attr-defined]
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, name="token-server", daemon=True
        )
        self._thread.start()

    def __enter__(self: ServerT) -> ServerT:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=5)

    def inject(self, *faults: str) -> None:
        with self._lock:
            self._faults.extend(faults)

    @property
    def received(self) -> list[Received]:
        with self._lock:
            return list(self._received)

    def _handle(self, handler: _Handler) -> None:
        length = int(handler.headers.get("Content-Length", "0"))
        body = handler.rfile.read(length)
        with self._lock:
            self._received.append(
                Received(handler.command, handler.path, dict(handler.headers.items()), body)
            )
            fault = self._faults.popleft() if self._faults else None
        if fault == "slow":
            self.stopping.wait(30)
        if fault == "500":
            self.reply(handler, 500, b"Transient error - try again\n", "text/plain")
            return
        self.answer(handler, body, fault)

    def answer(self, handler: _Handler, body: bytes, fault: str | None) -> None:
        raise NotImplementedError

    @staticmethod
    def reply(handler: _Handler, status: int, body: bytes, content_type: str = "application/json") -> None:
        handler.send_response(status)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)


class LocalAuthServer(TokenServer):
    """luci's local auth server: ``GetOAuthToken`` for the accounts it holds."""

    def __init__(
        self, tokens: dict[str, str], *, secret: bytes = b"s3cr3t-bytes", lifetime: float = 3600
    ) -> None:
        self.tokens = tokens
        self.secret = base64.b64encode(secret).decode()
        self.lifetime = lifetime
        super().__init__()

    def write_context(self, path: Path, default_account: str | None = None) -> Path:
        """A LUCI_CONTEXT file pointing at this server."""
        accounts = [{"id": account, "email": f"{account}@example.test"} for account in self.tokens]
        local_auth: dict[str, Any] = {"rpc_port": self.port, "secret": self.secret, "accounts": accounts}
        if default_account is not None:
            local_auth["default_account_id"] = default_account
        path.write_text(
            json.dumps({"local_auth": local_auth, "swarming": {"secret_bytes": "eA=="}}), encoding="utf-8"
        )
        return path

    def answer(self, handler: _Handler, body: bytes, fault: str | None) -> None:
        if handler.path != "/rpc/LuciLocalAuthService.GetOAuthToken":
            self.reply(handler, 404, b"Expecting /rpc/LuciLocalAuthService.<method>", "text/plain")
            return
        try:
            request = json.loads(body)
        except ValueError:
            self.reply(handler, 400, b"Not JSON body", "text/plain")
            return
        if request.get("secret") != self.secret:
            self.reply(handler, 403, b"Invalid secret.\n", "text/plain")
            return
        token = self.tokens.get(request.get("account_id", ""))
        if token is None:
            self.reply(
                handler, 404, f"Unrecognized account ID {request.get('account_id')!r}.".encode(), "text/plain"
            )
            return
        if fault == "error":
            reply: dict[str, Any] = {"error_code": 4, "error_message": "the account is disabled"}
        else:
            reply = {"access_token": token, "expiry": int(time.time() + self.lifetime)}
        self.reply(handler, 200, json.dumps(reply).encode() + b"\n")


class MetadataServer(TokenServer):
    """The GCE metadata server's token endpoint."""

    def __init__(self, tokens: dict[str, str], *, expires_in: int = 3599) -> None:
        self.tokens = tokens
        self.expires_in = expires_in
        super().__init__()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def answer(self, handler: _Handler, body: bytes, fault: str | None) -> None:
        if handler.headers.get("Metadata-Flavor") != "Google":
            self.reply(handler, 403, b"Missing Metadata-Flavor:Google header.", "text/plain")
            return
        prefix, suffix = "/computeMetadata/v1/instance/service-accounts/", "/token"
        account = handler.path.removeprefix(prefix).removesuffix(suffix)
        token = self.tokens.get(account)
        if not handler.path.startswith(prefix) or not handler.path.endswith(suffix) or token is None:
            self.reply(handler, 404, b"Not Found", "text/plain")
            return
        reply: dict[str, Any] = {"access_token": token, "expires_in": self.expires_in, "token_type": "Bearer"}
        if fault == "incomplete":
            reply = {"token_type": "Bearer"}
        self.reply(handler, 200, json.dumps(reply).encode())


class OAuthServer(TokenServer):
    """An OAuth2 token endpoint granting a token for any JWT bearer assertion."""

    def __init__(self, token: str) -> None:
        self.token = token
        super().__init__()

    @property
    def token_uri(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def assertions(self) -> list[dict[str, Any]]:
        """The claims of every assertion received."""
        claims = []
        for received in self.received:
            form = urllib.parse.parse_qs(received.body.decode())
            payload = form["assertion"][0].split(".")[1]
            claims.append(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))))
        return claims

    def answer(self, handler: _Handler, body: bytes, fault: str | None) -> None:
        form = urllib.parse.parse_qs(body.decode())
        if (
            form.get("grant_type") != ["urn:ietf:params:oauth:grant-type:jwt-bearer"]
            or "assertion" not in form
        ):
            self.reply(handler, 400, b'{"error": "invalid_grant"}')
            return
        self.reply(handler, 200, json.dumps({"access_token": self.token, "expires_in": 3600}).encode())
