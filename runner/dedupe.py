"""Content dedupe (``inbox.dedupe = "content"``): which ready single-file calls need no bem call.

A file's *content key* is its sha256, workflow and inputType. Just before a ready ``singleFile``
call would be sent, the store decides, in one transaction, with :func:`decide`:

- **reuse**: a file with the same key already has a *completed result* (its document is a
  result, from a call bem reported ``completed``, made by this store — a single file or one item
  of a batch). The call ends at once, without a bem call, and its document is that result's,
  marked ``reusedFrom``.
- **wait**: another file with the same key is on its way to bem or back (its call open,
  sending, unknown, polling, or finished but not yet delivered; a batch about to be sent; a
  single file ready with a lower id). The call
  waits; the delivery (or disappearance) of that file wakes it, and it is decided again.
- **send**: otherwise. Of several ready files with one key, the oldest call is sent.

A failed result is never reused: a waiter whose leader ended in an error is decided again, so
the oldest waiter is sent next (once) and the others wait for it in turn. Batch calls are never
shortened: a file inside a folder or window call is always sent with it, but its completed
result can be reused by a later single file.

Pure: the store reads the facts, this says what to do with them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

import msgspec

NOT_WAITED_FOR = frozenset({"waiting", "done"})
"""Peers in these states are not on their way: a waiter waits for no other waiter."""


class ContentKey(msgspec.Struct, frozen=True, order=True):
    sha256: str
    workflow: str
    input_type: str


class Candidate(msgspec.Struct, frozen=True):
    """A ready single-file call about to be sent, and its file's content key."""

    call_row_id: int
    key: ContentKey


class Peer(msgspec.Struct, frozen=True):
    """A queued file's call with the same key (a candidate is its own peer): id and state."""

    call_row_id: int
    state: str
    batch: bool = False
    """A folder or window call: it is always sent, so it is waited for even when younger."""


class Source(msgspec.Struct, frozen=True):
    """A completed result: the file it was delivered to, and the call that produced it."""

    file_id: int
    call_id: str


class Decision(msgspec.Struct, frozen=True):
    call_row_id: int
    action: Literal["reuse", "wait", "send"]
    source: Source | None = None


def decide(
    candidates: Sequence[Candidate],
    sources: Mapping[ContentKey, Source],
    peers: Mapping[ContentKey, Iterable[Peer]],
) -> list[Decision]:
    """Per candidate (in the order given): reuse a source, wait for a peer, or send.

    A candidate waits for a peer that is past ``ready`` (it is being sent or is back), for a
    batch (batches never wait), or for a ready single file that is older: so of ready single
    files exactly the oldest is sent, and no two calls can wait for each other.
    """
    decisions: list[Decision] = []
    for candidate in candidates:
        source = sources.get(candidate.key)
        if source is not None:
            decisions.append(Decision(candidate.call_row_id, "reuse", source))
        elif any(_waits_for(candidate, peer) for peer in peers.get(candidate.key, ())):
            decisions.append(Decision(candidate.call_row_id, "wait"))
        else:
            decisions.append(Decision(candidate.call_row_id, "send"))
    return decisions


def _waits_for(candidate: Candidate, peer: Peer) -> bool:
    if peer.call_row_id == candidate.call_row_id or peer.state in NOT_WAITED_FOR:
        return False
    if peer.state == "ready" and not peer.batch:
        return peer.call_row_id < candidate.call_row_id
    return True


def content_key(
    sha256: str | None, workflow: str | None, input_type: str | None
) -> ContentKey | None:
    """The key of a file, or None when it has none (such a file is always sent)."""
    if not sha256 or not workflow or not input_type:
        return None
    return ContentKey(sha256, workflow, input_type)


__all__ = ["Candidate", "ContentKey", "Decision", "Peer", "Source", "content_key", "decide"]
