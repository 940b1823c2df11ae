"""The OpenAI-compatible HTTP API: `interface` (chats -> jobs, replies -> the client) and
`server` (Starlette routes on uvicorn, in a thread of the daemon)."""

from daemon.http.interface import HttpInterface
from daemon.http.server import HttpServer, HttpStartError

__all__ = ["HttpInterface", "HttpServer", "HttpStartError"]
