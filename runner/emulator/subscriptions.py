"""``/v3/webhook-secret`` and ``/v3/subscriptions``: what decides which events go where, signed how.

Shapes follow the official SDK (``bem.types.SubscriptionV3``, ``WebhookSecret``): a subscription
is answered as the object itself, a listing as a JSON array of them, deletes as 204. Optional
fields without a value are left out. The secret is returned by ``POST`` (a new one, replacing any
other) and ``GET`` (the active one; 404 if none); ``DELETE`` revokes it and deliveries go unsigned.
"""

from __future__ import annotations

import secrets
import urllib.parse
from typing import Any, Literal

import msgspec
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from runner.emulator.errors import InvalidRequest, NotFound
from runner.emulator.inputs import parse_json_body, reject_unknown

SUBSCRIPTION_TYPES: tuple[str, ...] = (
    "transform", "analyze", "route", "join", "split_collection", "split_item", "evaluation",
    "error", "payload_shaping", "enrich", "collection_processing",
)  # fmt: skip
DEFAULT_LIMIT = 50
MAX_LIMIT = 100

# JSON field → attribute, in the order the SDK declares them.
_FIELDS: dict[str, str] = {
    "name": "name",
    "type": "type",
    "functionName": "function_name",
    "functionID": "function_id",
    "collectionName": "collection_name",
    "collectionID": "collection_id",
    "webhookURL": "webhook_url",
    "disabled": "disabled",
    "s3Bucket": "s3_bucket",
    "s3FilePath": "s3_file_path",
    "googleDriveFolderID": "google_drive_folder_id",
}
_UPDATABLE = frozenset(
    {"disabled", "functionName", "googleDriveFolderID", "name", "s3Bucket", "s3FilePath",
     "type", "webhookURL"}
)  # fmt: skip
_LIST_QUERY = frozenset({"functionNames", "limit", "sortOrder", "startingAfter", "endingBefore"})


class Subscription(msgspec.Struct, frozen=True):
    subscription_id: str
    seq: int
    name: str
    type: str
    function_name: str | None = None
    function_id: str | None = None
    collection_name: str | None = None
    collection_id: str | None = None
    webhook_url: str | None = None
    disabled: bool | None = None
    s3_bucket: str | None = None
    s3_file_path: str | None = None
    google_drive_folder_id: str | None = None

    def render(self) -> dict[str, Any]:
        shown: dict[str, Any] = {"subscriptionID": self.subscription_id}
        for key, attribute in _FIELDS.items():
            value = getattr(self, attribute)
            if value is not None:
                shown[key] = value
        return shown

    def hears(self, event: dict[str, Any]) -> bool:
        """Whether an event goes to this subscription's webhook URL."""
        if self.disabled or not self.webhook_url:
            return False
        wanted = "error" if event.get("eventType") == "error" else event.get("eventType")
        if self.type != wanted:
            return False
        if self.function_id is not None:
            return bool(event.get("functionID") == self.function_id)
        return self.function_name is not None and event.get("functionName") == self.function_name


class WebhookBook(msgspec.Struct):
    """The environment's signing secret and its subscriptions, in creation order."""

    secret: str | None = None
    subscriptions: dict[str, Subscription] = msgspec.field(default_factory=dict)
    _created: int = 0

    def new_secret(self) -> str:
        self.secret = f"whsec_{secrets.token_urlsafe(32)}"
        return self.secret

    def add(self, fields: dict[str, Any]) -> Subscription:
        self._created += 1
        subscription = Subscription(
            subscription_id=f"sub_{secrets.token_hex(4)}{self._created:08d}",
            seq=self._created,
            **fields,
        )
        self.subscriptions[subscription.subscription_id] = subscription
        return subscription

    def hearing(self, event: dict[str, Any]) -> list[Subscription]:
        return [s for s in self.subscriptions.values() if s.hears(event)]


def subscription_routes(book: WebhookBook) -> list[BaseRoute]:
    routes = _Routes(book)
    return [
        Route("/v3/webhook-secret", routes.secret, methods=["GET", "POST", "DELETE"]),
        Route("/v3/subscriptions", routes.collection, methods=["GET", "POST"]),
        Route("/v3/subscriptions/{subscriptionID}", routes.one, methods=["GET", "PATCH", "DELETE"]),
    ]


class _Routes:
    def __init__(self, book: WebhookBook) -> None:
        self._book = book

    async def secret(self, request: Request) -> Response:
        book = self._book
        if request.method == "POST":
            return JSONResponse({"secret": book.new_secret()})
        if request.method == "DELETE":
            book.secret = None
            return Response(status_code=204)
        if book.secret is None:
            raise NotFound("no webhook signing secret has been generated for this environment")
        return JSONResponse({"secret": book.secret})

    async def collection(self, request: Request) -> Response:
        if request.method == "POST":
            body = parse_json_body(await request.body())
            subscription = self._book.add(parse_new_subscription(body))
            return JSONResponse(subscription.render())
        return JSONResponse([s.render() for s in self._list(request)])

    async def one(self, request: Request) -> Response:
        subscription_id = request.path_params["subscriptionID"]
        found = self._book.subscriptions.get(subscription_id)
        if found is None:
            raise NotFound(f"subscription {subscription_id!r} not found")
        if request.method == "DELETE":
            del self._book.subscriptions[subscription_id]
            return Response(status_code=204)
        if request.method == "PATCH":
            changes = parse_subscription_changes(parse_json_body(await request.body()))
            found = msgspec.structs.replace(found, **changes)
            check_target(found)
            self._book.subscriptions[subscription_id] = found
        return JSONResponse(found.render())

    def _list(self, request: Request) -> list[Subscription]:
        params = request.query_params
        reject_unknown(params, _LIST_QUERY, "query")
        for key in params:
            if len(params.getlist(key)) > 1:
                raise InvalidRequest(f"query parameter {key}: given more than once")
        names = {n for n in params.get("functionNames", "").split(",") if n}
        ordered = sorted(
            (s for s in self._book.subscriptions.values() if not names or s.function_name in names),
            key=lambda s: s.seq,
            reverse=_sort_order(params.get("sortOrder")) == "desc",
        )
        limit = _limit(params.get("limit"))
        if (after := params.get("startingAfter")) is not None:
            ids = [s.subscription_id for s in ordered]
            ordered = ordered[_cursor(ids, after, "startingAfter") + 1 :]
        if (before := params.get("endingBefore")) is not None:
            cut = _cursor([s.subscription_id for s in ordered], before, "endingBefore")
            return ordered[:cut][-limit:]
        return ordered[:limit]


def parse_new_subscription(body: dict[str, Any]) -> dict[str, Any]:
    reject_unknown(body, frozenset(_FIELDS), "request body")
    for required in ("name", "type"):
        if required not in body:
            raise InvalidRequest(f"{required}: required")
    fields: dict[str, Any] = {_FIELDS[key]: _checked(key, value) for key, value in body.items()}
    probe = Subscription(subscription_id="", seq=0, **fields)
    check_target(probe)
    return fields


def parse_subscription_changes(body: dict[str, Any]) -> dict[str, Any]:
    reject_unknown(body, _UPDATABLE, "request body")
    return {_FIELDS[key]: _checked(key, value) for key, value in body.items()}


def check_target(subscription: Subscription) -> None:
    """At most one of function name/ID and of collection name/ID, and not both kinds."""
    function = subscription.function_name is not None or subscription.function_id is not None
    collection = subscription.collection_name is not None or subscription.collection_id is not None
    if subscription.function_name is not None and subscription.function_id is not None:
        raise InvalidRequest("give functionName or functionID, not both")
    if subscription.collection_name is not None and subscription.collection_id is not None:
        raise InvalidRequest("give collectionName or collectionID, not both")
    if function and collection:
        raise InvalidRequest("a subscription targets a function or a collection, not both")


def _checked(key: str, value: object) -> object:
    if key == "disabled":
        if not isinstance(value, bool):
            raise InvalidRequest("disabled: must be a boolean")
        return value
    if not isinstance(value, str) or not value:
        raise InvalidRequest(f"{key}: must be a non-empty string")
    if key == "type" and value not in SUBSCRIPTION_TYPES:
        raise InvalidRequest(f"type: {value!r} not among {', '.join(SUBSCRIPTION_TYPES)}")
    if key == "webhookURL" and not _http_url(value):
        raise InvalidRequest("webhookURL: must be an http:// or https:// URL")
    return value


def _http_url(value: str) -> bool:
    try:
        parts = urllib.parse.urlsplit(value)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def _sort_order(value: str | None) -> Literal["asc", "desc"]:
    if value in (None, "asc"):
        return "asc"
    if value == "desc":
        return "desc"
    raise InvalidRequest(f"sortOrder: {value!r} is neither asc nor desc")


def _limit(value: str | None) -> int:
    if value is None:
        return DEFAULT_LIMIT
    if not value.isascii() or not value.isdigit() or not 1 <= int(value) <= MAX_LIMIT:
        raise InvalidRequest(f"limit: must be a whole number from 1 to {MAX_LIMIT}")
    return int(value)


def _cursor(ids: list[str], subscription_id: str, name: str) -> int:
    try:
        return ids.index(subscription_id)
    except ValueError:
        raise InvalidRequest(f"{name}: no subscription with ID {subscription_id!r}") from None
