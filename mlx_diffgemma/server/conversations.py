"""Recent conversations, kept encoded, so a resent conversation encodes only its new turn.

OpenAI clients send the whole conversation with every request. After an
answer the server keeps its cache (prompt, answer, stop token) with the ids the
conversation renders to once the client adds that answer as an ``assistant``
message. A later request whose rendering extends those ids takes the cache
over and encodes only the rest (``chat.continuation``, the rule ``chat`` uses),
if the images it holds are the request's first images (``ChatCache.images``).
A cache serves one request at a time: it leaves the store while in use.
Least recently stored caches go first when there are more than ``max_entries``
or their arrays hold more than ``max_bytes``. Under mlx.launch each process
holds its share of every cache; process 0's count of caches to drop is every
process's (``agree``), so all keep the same conversations.
"""

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple

from ..chat import ChatCache, continuation


@dataclass
class Conversation:
    rendered: List[int]  # the conversation's ids, its last answer included
    chat_cache: ChatCache


class Conversations:
    def __init__(self, max_entries: int, max_bytes: Optional[int] = None):
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self.entries: "OrderedDict[int, Conversation]" = OrderedDict()
        self._next = 0
        # Under mlx.launch, process 0's decision on every process (the worker sets it).
        self.agree: Callable[[Any], Any] = lambda value: value

    @property
    def nbytes(self) -> int:
        return sum(e.chat_cache.cache.nbytes for e in self.entries.values())

    def take(self, full: List[int], images: Sequence[str] = ()) -> Optional[Tuple[ChatCache, List[int]]]:
        """The cache of the longest stored conversation ``full`` continues, and
        the ids still to encode; the entry leaves the store. ``images``: the
        digests of the request's images, in order; a cache is taken only if
        the images it holds are the first of them (the same ids with another
        picture are another conversation), and the images after those are the
        ones still to encode."""
        best = None
        for key, entry in self.entries.items():
            held = entry.chat_cache.images
            if list(images[: len(held)]) != list(held):
                continue
            rest = continuation(full, entry.rendered, entry.chat_cache.stop_token)
            if rest is not None and (best is None or len(rest) < len(best[1])):
                best = (key, rest)
        if best is None:
            return None
        entry = self.entries.pop(best[0])
        return entry.chat_cache, best[1]

    def put(self, rendered: List[int], chat_cache: ChatCache):
        if self.max_entries < 1:
            return
        self.entries[self._next] = Conversation(rendered, chat_cache)
        self._next += 1
        # Oldest first; sizes only when bounded (a cache is read only then).
        sizes = [0 if self.max_bytes is None else e.chat_cache.cache.nbytes for e in self.entries.values()]
        drop = 0
        while len(sizes) - drop > self.max_entries or (
            self.max_bytes is not None and drop < len(sizes) and sum(sizes[drop:]) > self.max_bytes
        ):
            drop += 1
        for _ in range(self.agree(drop)):
            self.entries.popitem(last=False)
