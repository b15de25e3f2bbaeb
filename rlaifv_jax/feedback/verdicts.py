"""The labeler's verdict on a claim and a response's score (METHOD.md §3–4)."""
from __future__ import annotations

from typing import Sequence


def accept_claim(p_yes: float, p_no: float) -> bool:
    """A claim is accepted iff the labeler puts more mass on yes than on no (ties reject)."""
    return bool(p_yes > p_no)


def response_score(accepted: Sequence[bool]) -> int:
    """Score of a response: minus the number of rejected claims."""
    return -sum(1 for a in accepted if not a)
