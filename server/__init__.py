"""The HTTP / WebSocket server: OpenAI's speech API on one warm engine (`misotts serve`)."""
from .app import create_app

__all__ = ["create_app"]
