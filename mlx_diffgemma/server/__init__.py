"""An OpenAI-compatible HTTP server for DiffusionGemma (docs/server.md).

- ``protocol``: request checking and response bodies;
- ``output``: generated text into ``content``, ``reasoning_content`` and ``tool_calls``;
- ``conversations``: recent conversations kept encoded;
- ``images``: which image sources a request may name, read before it is queued;
- ``worker``: the one thread that runs the model, batches of requests taking turns a canvas each;
- ``http``: routes, limits, authentication and streaming.

``python -m mlx_diffgemma.server`` is the command line (``cli.server``).
"""

from .conversations import Conversations
from .http import Config, make_server
from .images import ImagePolicy
from .worker import Settings, Worker

__all__ = ["Config", "Conversations", "ImagePolicy", "Settings", "Worker", "make_server"]
