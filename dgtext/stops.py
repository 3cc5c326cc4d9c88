"""Stop strings (OpenAI's `stop`): where generated text ends, shared by the worker (which cuts the stored
result and ends the request early) and the API (which cuts streamed deltas the same way).

Contract: generation ends at the *earliest* occurrence of any stop string; the text is cut right before it
(the stop string itself is not returned) and the finish reason is "stop".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


def first_stop(text: str, stops: Sequence[str] | None) -> int | None:
    """Index in `text` where the earliest stop string starts, or None when none occurs."""
    hits = [index for index in (text.find(stop) for stop in stops or ()) if index >= 0]
    return min(hits) if hits else None


def cut_at_stop(text: str, stops: Sequence[str] | None) -> tuple[str, bool]:
    """(`text` cut before the earliest stop string, whether one occurred)."""
    index = first_stop(text, stops)
    return (text, False) if index is None else (text[:index], True)


def ids_within(ids: Sequence[int], length: int, decode: Callable[[Sequence[int]], str]) -> list[int]:
    """The longest prefix of `ids` whose decoded text is at most `length` characters (binary search over
    prefix lengths: decoding is monotone in the prefix, O(n log n) decodes instead of O(n^2))."""
    low, high = 0, len(ids)
    while low < high:
        middle = (low + high + 1) // 2
        if len(decode(ids[:middle])) <= length:
            low = middle
        else:
            high = middle - 1
    return list(ids[:low])


def safe_prefix_length(text: str, stops: Sequence[str] | None) -> int:
    """How much of a growing `text` can be sent now without a stop string that may still complete: all of
    it minus the longest tail that is a proper prefix of some stop string (streaming holds that tail back)."""
    held = 0
    for stop in stops or ():
        for size in range(min(len(stop) - 1, len(text)), held, -1):
            if text.endswith(stop[:size]):
                held = size
                break
    return len(text) - held
