"""Seeds and settings for the API fuzz runs (tests/*/test_*_fuzz.py).

Each run draws new examples (Hypothesis' ``derandomize`` stays off and no example
database is kept), from a seed that is printed and attached to any failure, so the
failing run can be repeated exactly: ``FOGLINE_FUZZ_SEED=<seed> pytest …``.
"""

from __future__ import annotations

import os
import random
import zlib
from collections.abc import Callable
from typing import Any, TypeVar

from hypothesis import HealthCheck, Phase, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

__all__ = ["SEED", "any_text", "fuzz", "mostly", "reproducible"]

F = TypeVar("F", bound=Callable[..., Any])


def _seed() -> int:
    raw = os.environ.get("FOGLINE_FUZZ_SEED", "").strip()
    if raw:
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"FOGLINE_FUZZ_SEED must be an integer, got {raw!r}") from None
    return random.SystemRandom().randrange(2**32)


SEED = _seed()


def fuzz(name: str, max_examples: int) -> Callable[[F], F]:
    """Hypothesis settings for one bounded fuzz run named ``name`` (a test id): at most
    ``max_examples`` examples, seeded from :data:`SEED` and the name, so each run of the
    module draws other examples than the last unless ``FOGLINE_FUZZ_SEED`` is set."""

    def wrap(test: F) -> F:
        seeded = hypothesis_seed(SEED ^ zlib.crc32(name.encode()))(test)
        return settings(  # type: ignore[no-any-return]
            max_examples=max_examples,
            derandomize=False,
            database=None,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            # No shrinking: each example costs several real requests, and shrinking a
            # failure could run for minutes; the seed repeats the failing run instead.
            phases=(Phase.explicit, Phase.generate),
            report_multiple_bugs=False,
        )(seeded)

    return wrap


def reproducible(run: Callable[[], None]) -> None:
    """Call a Hypothesis test; a failure carries the line that repeats it."""
    print(f"fuzz seed: FOGLINE_FUZZ_SEED={SEED}")  # shown with a failure
    try:
        run()
    except BaseException as exc:
        exc.add_note(f"repeat this run with FOGLINE_FUZZ_SEED={SEED}")
        raise


def any_text(max_size: int = 20) -> st.SearchStrategy[str]:
    """Text, sometimes with a lone UTF-16 surrogate in it: what JSON's ``"\\ud800"``
    escape becomes in Python, a ``str`` that cannot be written as UTF-8. (Hypothesis'
    text leaves surrogates out; a high one alone never pairs with the text around it.)"""
    half = max(1, max_size // 2)
    lone = st.characters(min_codepoint=0xD800, max_codepoint=0xDBFF)
    odd = st.tuples(st.text(max_size=half), lone, st.text(max_size=half)).map("".join)
    return mostly(st.text(max_size=max_size), odd)


def mostly(common: st.SearchStrategy[Any], rare: st.SearchStrategy[Any], one_in: int = 5) -> Any:
    """``common``, and ``rare`` about one time in ``one_in``. (Hypothesis picks the first
    branch of ``one_of`` most often and folds repeated branches into one, so neither
    ``one_of(common, rare)`` nor ``one_of(common, common, rare)`` weighs like this.)"""
    return st.sampled_from([False] * (one_in - 1) + [True]).flatmap(
        lambda pick_rare: rare if pick_rare else common
    )
