"""An OpenAI-compatible HTTP server for DiffusionGemma (docs/server.md).

- ``protocol``: request checking and response bodies;
- ``output``: generated text into ``content``, ``reasoning_content`` and ``tool_calls``;
- ``conversations``: recent conversations kept encoded;
- ``worker``: the one thread that runs the model, requests taking turns a canvas each;
- ``http``: routes, limits, authentication and streaming.

``python -m mlx_diffgemma.server`` is the command line (``cli.server``).
"""

from .conversations import Conversations
from .http import Config, make_server
from .worker import Settings, Worker

__all__ = ["Config", "Conversations", "Settings", "Worker", "make_server"]
