"""A chat's messages as a template: where each content goes, what its placeholder is called, and where a message
quotes a response this replica generated.

This module owns the text side of a chat (no engine, no KV): `chat_template` makes an OpenAI-style chat's messages
a `ChatTemplate` (fixed text with placeholders, tokenized piece by piece by `kvcomm.templates.render_template`, as
an agent's template is); `chat_placeholder` names a message's placeholder; `quote_pieces` cuts a message that
carries an earlier response as text (CrewAI writes the earlier tasks' outputs into one user message) so that
response can enter as its producer's token ids and KV; `chat_prompt_ids` is the prompt of a chat none of whose
contents was kept. Reusing contents across requests is `kvcomm.chat`'s business.
"""
from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Collection, Mapping, Sequence

from .templates import TemplateError, chat_text, render_template

QUOTE_PROBE_CHARS = 8                  # a response is looked for in a message only if it has its last characters
CHAT_AGENT_ID = "chat"                  # the agent id of every chat template (consumer keys add its digest)
ROLES = ("system", "user", "assistant", "tool")
_SENTINEL = "\u2063"                   # INVISIBLE SEPARATOR: marks where a content goes while the template renders


CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"   # OpenAI's error code for a prompt or output too long


class ChatRequestError(ValueError):
    """A chat cannot run as given; `param` names the offending field (OpenAI's ``error.param``), `code` is OpenAI's
    ``error.code`` where one applies (`CONTEXT_LENGTH_EXCEEDED`, which clients read to shorten the history)."""

    def __init__(self, param: str, message: str, code: str | None = None):
        self.param, self.code = param, code
        super().__init__(f"{param}: {message}")


@dataclass(frozen=True)
class ChatMessage:
    role: str                 # system | user | assistant | tool
    content: str
    name: str = ""            # the sender: OpenAI's `name` (a framework's agent name), or a tool call's id


def chat_placeholder(role: str, sender: str, ordinal: int) -> str:
    """``chat_<role>_<sender>_<ordinal>``: the placeholder a chat message's content fills, and so what its anchors
    are keyed by in the pool (with the namespace). `sender` is the message's ``name`` (letters and digits kept, a
    short hash added when anything else was dropped; ``anon`` without a name); `ordinal` the position class: how
    many earlier messages of the same role and sender the chat holds. So the task a group chat's user posted is
    ``chat_user_user_0`` and agent ``solver``'s first answer ``chat_user_solver_0`` in every other agent's request
    (AutoGen passes other agents' messages as user messages named after them), ``chat_assistant_solver_0`` where
    a framework passes them as named assistant messages (LangGraph), whatever agent reads them: one anchor list per
    kind of content, each anchor holding the deltas of every consumer that read it."""
    key = re.sub(r"[^A-Za-z0-9]", "", sender)[:32]
    if key != sender:
        key += hashlib.sha256(sender.encode()).hexdigest()[:6]
    return f"chat_{role}_{key or 'anon'}_{ordinal}"


@dataclass(frozen=True)
class ChatTemplate:
    """A chat's prompt as a template: message i has role ``roles[i]`` and content ``literals[i]``, or, where that is
    None, the contents of the next ``parts[i]`` placeholders of `names`, one after the other (more than one where
    the message quotes a known response: `quote_pieces`). Frozen and hashable: the engine keeps each template's
    fixed-segment KV (its leading segment is the chat's exact prefix cache)."""
    agent_id: str
    roles: tuple[str, ...]
    literals: tuple[str | None, ...]
    names: tuple[str, ...]
    parts: tuple[int, ...]              # placeholders per message (0 for a literal)

    def placeholders(self) -> tuple[str, ...]:
        return self.names

    def split(self, tokenizer: Any) -> tuple[list[str], list[str]]:
        """The chat template's text cut where each placeholder's content goes: (fixed texts, placeholder names);
        the placeholders of one message meet with an empty fixed text between them."""
        if any(_SENTINEL in (text or "") for text in self.literals):
            raise TemplateError("messages: a system message contains U+2063 (INVISIBLE SEPARATOR), which this "
                                "server uses to locate contents")
        slots = iter(range(len(self.names)))
        messages = [{"role": role, "content": text if text is not None else
                     "".join(f"{_SENTINEL}{next(slots)}{_SENTINEL}" for _ in range(count))}
                    for role, text, count in zip(self.roles, self.literals, self.parts)]
        try:
            text = chat_text(tokenizer, messages)
        except Exception as exc:  # noqa: BLE001 - a chat template that rejects these messages (jinja raises anything)
            raise TemplateError(f"messages: the model's chat template cannot render them: "
                                f"{type(exc).__name__}: {str(exc)[:200]}") from None
        pieces = re.split(f"{_SENTINEL}(\\d+){_SENTINEL}", text)    # [fixed0, slot0, fixed1, slot1, ...]
        if [int(slot) for slot in pieces[1::2]] != list(range(len(self.names))):
            raise TemplateError("messages: the model's chat template does not render every message's content "
                                "once and in order")
        return pieces[0::2], list(self.names)


def chat_template(messages: Sequence[ChatMessage], quotes_in: Callable[[str], Collection[str]] | None = None
                  ) -> tuple[ChatTemplate, dict[str, str]]:
    """The chat's template and the text behind each of its placeholders. Leading system messages and empty
    contents are fixed text; every other message's content is a placeholder (`chat_placeholder`), or, where it
    quotes any of ``quotes_in(content)`` (responses this replica generated, carried as text inside a longer
    message: CrewAI's task context), one placeholder per piece of `quote_pieces`, named after the message's
    placeholder with ``_quote<k>`` (the k-th quoted response) or ``_text<j>`` (the j-th piece of its own text)."""
    roles, literals, names, parts, slots = [], [], [], [], {}
    seen: Counter[tuple[str, str]] = Counter()
    leading = True
    for index, message in enumerate(messages):
        if message.role not in ROLES:
            raise ChatRequestError(f"messages[{index}].role", f"unknown role {message.role!r}; roles: "
                                                              f"{', '.join(ROLES)}")
        leading = leading and message.role == "system"
        roles.append(message.role)
        if leading or not message.content:
            literals.append(message.content)
            parts.append(0)
            continue
        name = chat_placeholder(message.role, message.name, seen[(message.role, message.name)])
        seen[(message.role, message.name)] += 1
        literals.append(None)
        pieces = quote_pieces(message.content, quotes_in(message.content) if quotes_in is not None else ())
        parts.append(len(pieces))
        if len(pieces) == 1:
            names.append(name)
            slots[name] = message.content
            continue
        counts = Counter[bool]()
        for text, quoted in pieces:
            piece = f"{name}_{'quote' if quoted else 'text'}{counts[quoted]}"
            counts[quoted] += 1
            names.append(piece)
            slots[piece] = text
    if not roles:
        raise ChatRequestError("messages", "at least one message is needed")
    return ChatTemplate(CHAT_AGENT_ID, tuple(roles), tuple(literals), tuple(names), tuple(parts)), slots


def quote_pieces(text: str, quotes: Collection[str]) -> list[tuple[str, bool]]:
    """`text` cut where it quotes any of `quotes`: [(piece, is a quote)], in order, every piece non-empty. The
    longest quotes are placed first, each at its every occurrence that overlaps no quote placed before; a quote equal
    to the whole text is no cut (the text is then one content, found as it is). No quote found: [(text, False)]."""
    found: list[tuple[int, int]] = []                  # [begin, end) of each placed quote
    for quote in sorted((q for q in quotes if q and q != text and q in text), key=len, reverse=True):
        at = text.find(quote)
        while at >= 0:
            end = at + len(quote)
            free = all(end <= b or at >= e for b, e in found)
            if free:
                found.append((at, end))
            at = text.find(quote, end if free else at + 1)
    if not found:
        return [(text, False)]
    pieces, cursor = [], 0
    for begin, end in sorted(found):
        if begin > cursor:
            pieces.append((text[cursor:begin], False))
        pieces.append((text[begin:end], True))
        cursor = end
    if cursor < len(text):
        pieces.append((text[cursor:], False))
    return pieces


def trims_contents(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template strips the whitespace around message contents (Llama 3's does): then
    a chat's contents are stripped before they are tokenized, as the template would render them."""
    return f" {_SENTINEL} " not in chat_text(tokenizer, [{"role": "user", "content": f" {_SENTINEL} "}])


def as_rendered(messages: Sequence[ChatMessage], trim: bool) -> tuple[ChatMessage, ...]:
    """The messages with their contents as the chat template renders them (stripped when it trims)."""
    if not trim:
        return tuple(messages)
    return tuple(ChatMessage(m.role, m.content.strip(), m.name) for m in messages)


def chat_prompt_ids(tokenizer: Any, messages: Sequence[ChatMessage | Mapping[str, str]]) -> list[int]:
    """The prompt a chat gets when none of its contents was kept from an earlier chat: its template's fixed pieces
    and each content tokenized on their own (what a dense oracle prefills). Messages as `ChatMessage`s or OpenAI
    dicts (role, content, name)."""
    template, slots = chat_template(as_rendered([m if isinstance(m, ChatMessage) else
                                                 ChatMessage(m["role"], m.get("content") or "", m.get("name") or "")
                                                 for m in messages], trims_contents(tokenizer)))
    rendered = render_template(template, tokenizer)
    return rendered.fill({name: tokenizer.encode(slots[name], add_special_tokens=False) for name in template.names})


def quoted_suffix(message: str, text: str, boundaries: Sequence[int], min_tokens: int) -> tuple[int, int] | None:
    """The token range [i, j) of the longest end of a response that `message` quotes: a framework may quote a
    response whole, or only what follows its reasoning (CrewAI takes what follows "Final Answer:"), whitespace
    stripped. `text` is the response, `boundaries` [n + 1] the character offset of each token boundary in it (0
    first, len(text) last). j is the response's end less trailing whitespace tokens; i the first token boundary
    from which ``text[boundaries[i]:boundaries[j]]`` occurs in `message`. None when no such quote has at least
    `min_tokens` tokens (the shortest, the last `min_tokens` tokens, is tried first: it rules out most responses)."""
    j = len(boundaries) - 1
    while j > 0 and text[boundaries[j - 1]:boundaries[j]].isspace():
        j -= 1
    end = boundaries[j]
    if j < min_tokens or text[boundaries[j - min_tokens]:end] not in message:
        return None
    for i in range(j - min_tokens + 1):
        if text[boundaries[i]:end] in message:
            return i, j
    return None

