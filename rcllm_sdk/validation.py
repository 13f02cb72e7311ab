"""Request validation at the API boundary: refuse what could silently serve something else.

``recommend(1.9)``, ``recommend(True)`` and ``recommend("1")`` would otherwise reach Feast as
user 1; a string handed to ``recommend_batch`` would be read as one user per character.
"""

from __future__ import annotations

from collections.abc import Iterable
from numbers import Integral

from .errors import InvalidRequestError

# Feast keys users by a signed 64-bit entity value; nothing outside it can be a stored user.
MIN_USER_ID, MAX_USER_ID = -(2**63), 2**63 - 1


def user_id(value) -> int:
    """``value`` as a user id: ``int`` or a numpy integer, never bool, float or str."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise InvalidRequestError(
            f"user_id must be an integer, got {type(value).__name__} {value!r}; "
            "convert ids read from text with int() first"
        )
    if not MIN_USER_ID <= int(value) <= MAX_USER_ID:
        raise InvalidRequestError(f"user_id {value} is outside the 64-bit range Feast stores ids in")
    return int(value)


def user_ids(values: Iterable) -> list[int]:
    """A list of user ids; a string or a single id is refused, not iterated."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise InvalidRequestError(
            f"user_ids must be a list of integers, got {type(values).__name__} {values!r}"
        )
    return [user_id(v) for v in values]


def count(value, name: str) -> int:
    """A positive-integer option such as ``k``: an ``int`` (or numpy integer), not bool/float/str/None."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise InvalidRequestError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    return int(value)


def item_ids(values, name: str = "candidates") -> list[int]:
    """A non-empty list of distinct integer item ids (a string or a single id is refused)."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise InvalidRequestError(
            f"{name} must be a list of item ids, got {type(values).__name__} {values!r}"
        )
    ids = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, Integral):
            raise InvalidRequestError(
                f"{name} must hold integer item ids, got {type(value).__name__} {value!r}"
            )
        ids.append(int(value))
    if not ids or len(set(ids)) != len(ids):
        raise InvalidRequestError(f"{name} must be a non-empty list of distinct item ids, got {ids}")
    return ids


def candidate_lists(values, n_users: int) -> list[list[int] | None]:
    """Per-user client candidates: ``None`` (the retriever's for everyone) or one entry per user,
    each a list of item ids or ``None`` (the retriever's for that user)."""
    if values is None:
        return [None] * n_users
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise InvalidRequestError(
            f"candidates must be one list of item ids per user, got {type(values).__name__}"
        )
    values = list(values)
    if len(values) != n_users:
        raise InvalidRequestError(
            f"candidates has {len(values)} entries for {n_users} users; give one per user"
        )
    return [None if v is None else item_ids(v) for v in values]
