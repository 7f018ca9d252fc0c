"""Chat SFT: ``messages`` rows rendered with a chat template, the loss on assistant turns only.

A row is ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}``, the
format chat datasets use (task ``sft``, detected from the ``messages`` column). Each message
has exactly those two keys, content a string, and a row at least one assistant message;
anything else is an error naming the file and line (a key such as ``weight`` would change
what is trained if it were ignored).

The template is the tokenizer's (``tokenizer_config.json``/``chat_template.jinja``) or the
Jinja file ``--chat-template FILE``; transformers renders it in its sandbox. The tokens an
assistant message adds are found prefix by prefix: the conversation up to the message with
the generation prompt (``add_generation_prompt=True``), then up to and including it, each
tokenised as the whole is. The second must extend the first and the whole conversation must
extend both, so the span between them is exactly the tokens of that answer (with its
end-of-turn marker, which the model must learn to emit). A template that breaks that prefix
property (one that rewrites earlier turns) is refused, never guessed at.
"""

from __future__ import annotations

import os

from peftcli.errors import BadInputError, UsageError

CHAT_ROLES = ("system", "user", "assistant")
IGNORE = -100  # transformers' ignore_index (as batching.IGNORE; batching imports this module)
MAX_TEMPLATE_BYTES = 1 << 20  # a chat template is a page of Jinja, not megabytes
_MESSAGES_HINT = 'each row is {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}'
_TEMPLATE_HINT = "give a chat template with `chat_template` FILE (a Jinja file, e.g. the chat_template of a chat model)"


def check_messages(path: str, lineno: int, value) -> list[dict]:
    """The ``messages`` of one row, validated (roles, string contents, an assistant turn)."""
    where = f"{path}:{lineno}"
    if not isinstance(value, list) or not value:
        raise BadInputError(f"{where}: 'messages' must be a non-empty list of messages", _MESSAGES_HINT)
    for n, message in enumerate(value, 1):
        if not isinstance(message, dict):
            raise BadInputError(f"{where}: message {n} is not an object", _MESSAGES_HINT)
        extra = sorted(str(k)[:40] for k in message if k not in ("role", "content"))
        if extra:
            raise BadInputError(f"{where}: message {n} has keys peftcli does not know: {', '.join(extra)}", "give each message only role and content")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise BadInputError(f"{where}: message {n} has role {str(role)[:40]!r}", "roles are system, user and assistant")
        if not isinstance(message.get("content"), str):
            raise BadInputError(f"{where}: message {n} ({role}) has no string 'content'", "write each message's content as a JSON string")
    if not any(m["role"] == "assistant" for m in value):
        raise BadInputError(f"{where}: the conversation has no assistant message, so nothing to learn", "add the assistant's answer, or drop the row")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def read_template(path: str | None) -> str | None:
    """The text of ``--chat-template FILE`` (None when not given)."""
    if path is None:
        return None
    if not os.path.isfile(path):
        raise BadInputError(f"`chat_template` {path}: no such file", "give the path of a Jinja chat template file")
    if os.path.getsize(path) > MAX_TEMPLATE_BYTES:
        raise BadInputError(f"`chat_template` {path}: larger than {MAX_TEMPLATE_BYTES:,} bytes", "a chat template is a short Jinja file; check the path")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError:
        raise BadInputError(f"`chat_template` {path}: not UTF-8 text", "save the template as UTF-8") from None


def resolve_template(chat: bool, option_path: str | None, tokenizer, model_dir: str) -> str | None:
    """The chat template a run renders with: ``--chat-template``'s, else the tokenizer's; None
    for data without ``messages`` (where ``--chat-template`` is refused: it would do nothing)."""
    if not chat:
        if option_path is not None:
            raise UsageError("`chat_template` applies to messages rows (chat sft) only", "drop `chat_template`, or use rows with messages")
        return None
    text = read_template(option_path)
    if text is None:
        text = getattr(tokenizer, "chat_template", None)
        if isinstance(text, dict):  # several named templates: the default one
            text = text.get("default")
    if not text:
        raise BadInputError(f"{model_dir}: the tokenizer has no chat template to render messages rows with", _TEMPLATE_HINT)
    return text


def render_chat(tokenizer, messages: list[dict], template: str, name: str, where: str, generation: bool) -> list[int]:
    try:
        ids = tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=True, add_generation_prompt=generation, return_dict=False,
        )
    except Exception as exc:  # the template is user code: whatever it raises is its error, on this row
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise BadInputError(f"{where}: the chat template ({name}) fails on this conversation: {first}", "fix the template, or the row") from None
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # some versions return a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def encode_messages(messages: list[dict], tokenizer, template: str, name: str, where: str, max_length: int) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation and labels: the ids on assistant tokens, IGNORE
    elsewhere; both truncated to ``max_length``."""
    full = render_chat(tokenizer, messages, template, name, where, generation=False)
    labels = [IGNORE] * len(full)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_chat(tokenizer, messages[:i], template, name, where, generation=True) if i else []
        after = render_chat(tokenizer, messages[: i + 1], template, name, where, generation=False)
        if after[: len(before)] != before or full[: len(after)] != after or len(after) == len(before):
            raise BadInputError(
                f"{where}: the chat template ({name}) does not render message {i + 1} (assistant) as an extension of the conversation before it",
                "use a template that renders each turn after the previous ones (no rewriting of earlier turns)",
            )
        labels[len(before) : len(after)] = full[len(before) : len(after)]
    return full[:max_length], labels[:max_length]
