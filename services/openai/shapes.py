"""OpenAI response shapes built from job results: text completions, chat completions (also FIM's answer),
their stream chunks, `usage` and `logprobs`.

A generate job's result is `{"text", "finish_reason", "usage", "token_ids", "logprobs"?}` (stop strings
already cut by the worker); an edit job's (FIM) is the edit result, whose one replacement is the middle.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from dgtext.stops import cut_at_stop, safe_prefix_length
from services.openai.translate import Plan, PlannedChoice

DRAFT_FIELD = "dgserve_draft"  # the streamed extension field: {"index", "canvas", "step", "text"}
_FINISH_REASONS = {"stop": "stop", "length": "length"}


def choice_text(result: dict[str, Any], stops: Sequence[str]) -> tuple[str, str]:
    """(text, finish_reason) of a finished job, cut at the first stop string."""
    edits = result.get("edits")
    text = str(edits[0]["replacement"]) if edits else str(result.get("text", ""))
    text, stopped = cut_at_stop(text, stops)
    reason = "stop" if stopped else _FINISH_REASONS.get(str(result.get("finish_reason")), "stop")
    return text, reason


def _completion_tokens(result: dict[str, Any]) -> int:
    if result.get("edits"):  # FIM: the middle's tokens (the canvas also holds the fixed suffix around it)
        return sum(int(edit.get("tokens", 0)) for edit in result["edits"])
    return int((result.get("usage") or {}).get("generated_tokens", 0))


def usage_of(results: Sequence[dict[str, Any]], choices: Sequence[PlannedChoice]) -> dict[str, int]:
    prompt = sum(int((r.get("usage") or {}).get("prompt_tokens", 0))
                 for r, c in zip(results, choices, strict=True) if c.counts_prompt)
    completion = sum(_completion_tokens(result) for result in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _top_by_token(top: list[dict[str, Any]]) -> dict[str, float]:
    """OpenAI's completions format keys alternatives by token text; ids decoding alike keep the best one."""
    by_token: dict[str, float] = {}
    for alternative in top:  # best first
        by_token.setdefault(alternative["token"], alternative["logprob"])
    return by_token


def _completion_logprobs(entries: list[dict[str, Any]], offset: int) -> dict[str, Any]:
    tokens, offsets, position = [], [], offset
    for entry in entries:
        tokens.append(entry["token"])
        offsets.append(position)
        position += len(entry["token"])
    return {"tokens": tokens, "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [_top_by_token(e.get("top", [])) for e in entries],
            "text_offset": offsets}


def _chat_logprobs(entries: list[dict[str, Any]]) -> dict[str, Any]:
    def one(entry: dict[str, Any]) -> dict[str, Any]:
        return {"token": entry["token"], "logprob": entry["logprob"], "bytes": list(entry["token"].encode())}

    content = [{**one(e), "top_logprobs": [one(t) for t in e.get("top", [])]} for e in entries]
    return {"content": content, "refusal": None}


@dataclass
class ResponseShape:
    """How one request words its answer: id, object names, choices."""

    plan: Plan
    id: str
    created: int
    model: str

    @property
    def chat(self) -> bool:
        return self.plan.chat_shaped

    def _envelope(self, choices: list[dict[str, Any]], chunk: bool) -> dict[str, Any]:
        kind = "chat.completion" if self.chat else "text_completion"
        if chunk and self.chat:
            kind += ".chunk"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}

    def logprobs_of(self, result: dict[str, Any], echo: str) -> dict[str, Any] | None:
        entries = result.get("logprobs")
        if entries is None:
            return None
        return _chat_logprobs(entries) if self.chat else _completion_logprobs(entries, len(echo))

    def choice(self, index: int, result: dict[str, Any]) -> dict[str, Any]:
        planned = self.plan.choices[index]
        text, reason = choice_text(result, self.plan.stops)
        logprobs = self.logprobs_of(result, planned.echo_text)
        if self.chat:
            return {"index": index, "message": {"role": "assistant", "content": text, "refusal": None},
                    "logprobs": logprobs, "finish_reason": reason}
        return {"index": index, "text": planned.echo_text + text, "logprobs": logprobs, "finish_reason": reason}

    def complete(self, results: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """The non-streamed answer once every choice's job succeeded."""
        choices = [self.choice(index, result) for index, result in enumerate(results)]
        return {**self._envelope(choices, chunk=False), "usage": usage_of(results, self.plan.choices)}

    def chunk(self, choices: list[dict[str, Any]], **extra: Any) -> str:
        """One `data:` frame of the event stream."""
        return f"data: {json.dumps({**self._envelope(choices, chunk=True), **extra})}\n\n"

    def delta(self, index: int, text: str | None, reason: str | None = None,
              logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
        if self.chat:
            body: dict[str, Any] = {"delta": {} if text is None else {"role": "assistant", "content": text}}
        else:
            body = {"text": text or ""}
        return {"index": index, **body, "logprobs": logprobs, "finish_reason": reason}


@dataclass
class ChoiceStream:
    """The streamed text of one choice: canvases arrive as whole texts; stop strings are cut here as the
    worker cuts the result, holding back a tail that could still become a stop string."""

    stops: Sequence[str]
    text: str = ""
    sent: int = 0
    stopped: bool = False
    pending: list[str] = field(default_factory=list)

    def add_canvas(self, canvas_text: str) -> str:
        """The part of the text that may be sent after this canvas ('' when nothing new is safe)."""
        if self.stopped:
            return ""
        self.text += canvas_text
        cut, self.stopped = cut_at_stop(self.text, self.stops)
        limit = len(cut) if self.stopped else safe_prefix_length(self.text, self.stops)
        return self._advance(cut, limit)

    def finish(self, final_text: str) -> str:
        """What is left to send once the job's (already cut) final text is known."""
        if not final_text.startswith(self.text[:self.sent]):
            return ""  # canvases decoded apart differ at a split character: keep what was sent
        return self._advance(final_text, len(final_text))

    def _advance(self, text: str, limit: int) -> str:
        piece = text[self.sent:limit] if limit > self.sent else ""
        self.sent = max(self.sent, limit)
        return piece
