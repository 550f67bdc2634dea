"""The store's errors. Each carries the HTTP status the web app answers with, so a route never
has to guess and never turns bad input into a 500."""

from __future__ import annotations


class StoreError(Exception):
    status_code = 400


class InvalidInput(StoreError, ValueError):
    """The request does not fit: wrong shape, unknown index, not a permutation, ..."""

    status_code = 422


class NotFound(StoreError, LookupError):
    status_code = 404


class Conflict(StoreError):
    """The write clashes with what is stored (e.g. a second label on one task by one annotator)."""

    status_code = 409


class IdempotencyMismatch(StoreError):
    """The idempotency key was already used with a different request body."""

    status_code = 422
