"""The hub's HTTP layer: app factory, handlers, authentication and problem responses."""

from .app import create_app
from .server import open_node, serve

__all__ = ["create_app", "open_node", "serve"]
