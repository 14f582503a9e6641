"""Agent prompt templates: fixed token segments with placeholders between them, at exact token boundaries.

An agent's prompt is its system prompt and user template put through the tokenizer's chat template, then
the assistant prefix. Placeholders (``{user_question}``, ``{agent_<id>_current}``, ``{agent_<id>_history}``,
``{condition_<id>_current}``) split it into fixed text segments ``F0, P1, F1, ..., Pn, Fn``; each fixed segment
is tokenized on its own and each placeholder's content is tokenized on its own (or is the producer's token
ids), so the dense path and every reuse path see the very same token sequence.

A template only has to say how its prompt text is cut (`split`): `AgentTemplate` cuts at the placeholders of its
user template; `kvcomm.chat_template.ChatTemplate` (an OpenAI chat's messages) at its messages' contents.
`render_template` tokenizes the pieces of either alike.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any, Mapping, Protocol, Sequence

PLACEHOLDER_PATTERN = re.compile(
    r"\{(user_question|agent_[A-Za-z0-9]+_(?:current|history)|condition_[A-Za-z0-9]+_(?:current|history))\}")


class TemplateError(ValueError):
    """A template is malformed, or rendered without the content one of its placeholders needs."""


@dataclass(frozen=True)
class AgentTemplate:
    agent_id: str
    system_prompt: str
    user_template: str          # text with {placeholders}
    assistant_prefix: str = ""  # text the assistant turn starts with (e.g. "A: ")

    def placeholders(self) -> tuple[str, ...]:
        return tuple(PLACEHOLDER_PATTERN.findall(self.user_template))

    def split(self, tokenizer: Any) -> tuple[list[str], list[str]]:
        """The prompt's text (system prompt and user template through the chat template, then the assistant
        prefix) cut at its placeholders: ``(fixed texts, placeholder names)``, one more fixed text than names."""
        stray = re.findall(r"\{[A-Za-z_][A-Za-z0-9_]*\}", PLACEHOLDER_PATTERN.sub("", self.user_template))
        if stray:
            raise TemplateError(f"agent {self.agent_id!r}: unknown placeholder(s) {', '.join(stray)}; "
                                "known forms: {user_question}, {agent_<id>_current}, {agent_<id>_history}, "
                                "{condition_<id>_current}, {condition_<id>_history}")
        messages = []
        if self.system_prompt:
            messages.append({"role": "system", "content": self.system_prompt})
        messages.append({"role": "user", "content": self.user_template})
        pieces = PLACEHOLDER_PATTERN.split(chat_text(tokenizer, messages) + self.assistant_prefix)
        return pieces[0::2], pieces[1::2]    # [fixed0, name1, fixed1, name2, fixed2, ...]


class PromptTemplate(Protocol):
    """What the engine needs of a template (`AgentTemplate`, `kvcomm.chat_template.ChatTemplate`): a name, and its
    prompt text cut at its placeholders. Implementations are frozen dataclasses (the engine caches by template)."""
    agent_id: str

    def split(self, tokenizer: Any) -> tuple[list[str], list[str]]: ...


@dataclass(frozen=True)
class RenderedTemplate:
    """Token segments of one agent's prompt: ``fixed[0], (placeholders[0], fixed[1]), ...``."""
    agent_id: str
    fixed: tuple[tuple[int, ...], ...]        # len(placeholders) + 1 fixed segments' token ids
    placeholders: tuple[str, ...]             # placeholder names in prompt order
    marker_ids: tuple[tuple[int, ...], ...]   # the tokens standing in for each placeholder in the template
    key: str                                  # content hash: identifies this exact template (anchor consumer key)

    def template_ids(self) -> list[int]:
        """The template with placeholder markers in place of content (what fixed-segment KV is computed on)."""
        ids = list(self.fixed[0])
        for marker, fixed in zip(self.marker_ids, self.fixed[1:]):
            ids += list(marker) + list(fixed)
        return ids

    def layout(self, content_lengths: Sequence[int]) -> "PromptLayout":
        """Positions of every segment when placeholder i holds content_lengths[i] tokens."""
        if len(content_lengths) != len(self.placeholders):
            raise TemplateError(f"{len(self.placeholders)} placeholders but {len(content_lengths)} contents")
        spans_ph, spans_fixed = [], [(0, len(self.fixed[0]))]
        cursor = len(self.fixed[0])
        for n, fixed in zip(content_lengths, self.fixed[1:]):
            spans_ph.append((cursor, cursor + n))
            cursor += n
            spans_fixed.append((cursor, cursor + len(fixed)))
            cursor += len(fixed)
        return PromptLayout(tuple(spans_fixed), tuple(spans_ph), cursor)

    def fill(self, contents: Mapping[str, Sequence[int]]) -> list[int]:
        """The full prompt's token ids with each placeholder's content tokens in place."""
        missing = [p for p in self.placeholders if p not in contents]
        if missing:
            raise TemplateError(f"agent {self.agent_id!r}: no content for placeholder(s) {', '.join(missing)}")
        ids = list(self.fixed[0])
        for name, fixed in zip(self.placeholders, self.fixed[1:]):
            ids += list(contents[name]) + list(fixed)
        return ids


@dataclass(frozen=True)
class PromptLayout:
    fixed_spans: tuple[tuple[int, int], ...]        # [start, end) of each fixed segment
    placeholder_spans: tuple[tuple[int, int], ...]  # [start, end) of each placeholder's content
    length: int


def chat_text(tokenizer: Any, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
    """`messages` through the tokenizer's chat template (then the assistant's turn header), or, for a tokenizer
    without one, a plain explicit layout (``role: content`` lines, then ``assistant: ``)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(list(messages), tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
    return text + ("assistant: " if add_generation_prompt else "")


def render_template(template: PromptTemplate, tokenizer: Any) -> RenderedTemplate:
    """Cut the template's prompt text at its placeholders (`split`) and tokenize every fixed piece on its own."""
    if not template.agent_id:
        raise TemplateError("agent_id must not be empty")
    fixed_texts, names = template.split(tokenizer)
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise TemplateError(f"agent {template.agent_id!r}: placeholder(s) used more than once: {', '.join(dup)}")

    def encode(s: str) -> tuple[int, ...]:
        return tuple(tokenizer.encode(s, add_special_tokens=False)) if s else ()

    fixed = tuple(encode(s) for s in fixed_texts)
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and getattr(tokenizer, "add_bos_token", False) and (not fixed[0] or fixed[0][0] != bos):
        fixed = ((bos,) + fixed[0],) + fixed[1:]
    markers = tuple(encode("{" + n + "}") for n in names)
    digest = hashlib.sha256(repr((fixed, markers)).encode()).hexdigest()[:16]
    return RenderedTemplate(template.agent_id, fixed, tuple(names), markers, key=f"{template.agent_id}:{digest}")
