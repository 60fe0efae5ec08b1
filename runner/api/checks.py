"""Is a call read back from bem the call the runner journalled?

A server that lost its state and reuses call IDs hands back another caller's call under a
known ID. Before a call's outputs are trusted, it must carry the ``callReferenceID`` the
runner sent, and in a batch every output event and every input must name an
``itemReferenceID`` the runner sent. Error events are not checked: an error may name the
call, or nothing, and still belongs to it.
"""

from __future__ import annotations

from collections.abc import Collection

from runner.api.models import Call

__all__ = ["call_mismatch"]

_SHOWN_MAX = 5


def call_mismatch(
    call: Call, *, call_reference_id: str, item_reference_ids: Collection[str] | None = None
) -> str | None:
    """Why ``call`` is not the call sent with these references, or None when it is.

    ``item_reference_ids``: the batch's items as sent (None for a single-file call).
    """
    if call.call_reference_id != call_reference_id:
        return (
            f"call {call.call_id} carries callReferenceID {call.call_reference_id!r}, "
            f"not {call_reference_id!r}"
        )
    if item_reference_ids is None:
        return None
    sent = set(item_reference_ids)
    named = {event.reference_id for event in call.outputs if event.reference_id is not None}
    strangers = sorted((named | _input_references(call)) - sent)
    if strangers:
        shown = ", ".join(repr(reference) for reference in strangers[:_SHOWN_MAX])
        more = f" and {len(strangers) - _SHOWN_MAX} more" if len(strangers) > _SHOWN_MAX else ""
        return f"call {call.call_id} names items that were not sent: {shown}{more}"
    return None


def _input_references(call: Call) -> set[str]:
    if call.input is None or call.input.batch_files is None:
        return set()
    return {
        item.item_reference_id
        for item in call.input.batch_files.inputs
        if item.item_reference_id is not None
    }
