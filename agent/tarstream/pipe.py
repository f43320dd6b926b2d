"""What the tar.zst worker threads and the event loop share: chunk sizes, queue depth,
the end-of-stream marker and the stop signal."""

from __future__ import annotations

CHUNK = 1 << 20  # compressed bytes handed over per queue item
COPY_BUFSIZE = 1 << 20
QUEUE_DEPTH = 4  # bounds memory: at most this many chunks wait for the uploader
DONE = object()  # queued after the last chunk


class Stopped(Exception):
    """The consumer went away; the worker unwinds quietly."""
