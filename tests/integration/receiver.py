"""A real HTTP receiver on loopback for notification tests: keeps every POST it gets."""

from __future__ import annotations

import base64
import email
import email.policy
import json
import socket
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Post:
    path: str
    content_type: str
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body)

    def form(self) -> tuple[dict[str, str], dict[str, tuple[str, bytes]]]:
        """A multipart body's text fields and its files {field: (filename, bytes)}."""
        message = email.message_from_bytes(f"Content-Type: {self.content_type}\r\n\r\n".encode() + self.body,
                                           policy=email.policy.default)
        fields, files = {}, {}
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            if part.get_filename():
                files[name] = (part.get_filename(), part.get_payload(decode=True))
            else:
                fields[name] = part.get_content()
        return fields, files

    def attachments(self) -> list[tuple[str, bytes]]:
        """(file name, bytes) of each attachment, json:// (base64) or form:// (multipart)."""
        if self.content_type.startswith("multipart/"):
            return list(self.form()[1].values())
        return [(a["filename"], base64.b64decode(a["base64"])) for a in self.json().get("attachments", [])]


class Receiver:
    """ThreadingHTTPServer on 127.0.0.1, an ephemeral port; a context manager."""

    def __init__(self):
        self.posts: list[Post] = []
        self.got = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.posts.append(Post(self.path, self.headers.get("Content-Type", ""), body))
                receiver.got.set()
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "Receiver":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def closed_port() -> int:
    """A loopback port nothing listens on (a receiver that is down)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
