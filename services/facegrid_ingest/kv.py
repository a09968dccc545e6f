"""Keys of a NATS KV bucket, read without leaving a consumer behind.

nats-py's ``KeyValue.keys()`` opens a watcher whose consumer stays on the server for
minutes after every call; the control loop asks for keys every few seconds. One
``stream_info`` request with a subjects filter names every key instead. A key's last
message may be a delete or purge marker: callers ``get`` each key and skip the ones
that are gone.
"""

from __future__ import annotations

from nats.js import JetStreamContext


async def bucket_keys(js: JetStreamContext, bucket: str) -> list[str]:
    """Every key with a message in ``bucket`` (deleted ones included), sorted."""
    prefix = f"$KV.{bucket}."
    info = await js.stream_info(f"KV_{bucket}", subjects_filter=f"{prefix}>")
    return sorted(subject[len(prefix) :] for subject in info.state.subjects or {})
