"""One row of chat data → a conversation or a preference pair, for each layout the public sets use.

- `messages`: `{"messages": [{"role", "content"}, ...]}` (UltraChat-200k, and most SFT sets);
- `alpaca`: `{"instruction", "input", "output"}` (+ optional `system`, and `history` as
  `[[user, assistant], ...]`, as LLaMA-Factory writes it): one user turn, instruction and input
  joined by a newline as LLaMA-Factory does;
- `oasst`: an OpenAssistant message tree (`{"prompt": {text, role, rank, deleted, replies}}`),
  flattened to its best-ranked path as oasst_top1 is: at each turn the reply ranked best (rank 0;
  unranked after ranked), deleted messages never, ending at the last assistant message;
- `preference`: `{"prompt", "chosen", "rejected"}` (UltraFeedback-binarized): `prompt` a string or
  a message list, `chosen`/`rejected` a string or message lists that may repeat the prompt (the
  shared prefix is the prompt, as TRL's implicit-prompt extraction does).

A row that cannot become a trainable example raises `BadRow` with a `reason` the stage counts
(`missing_field`, `not_a_list`, `bad_message`, `bad_role`, `empty_content`, `roles_out_of_order`,
`no_assistant_turn`, `chosen_equals_rejected`); nothing is ever silently dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

from model.chat import MessagesError, check_messages

Message = dict  # {"role": "system" | "user" | "assistant", "content": str}


class BadRow(ValueError):
    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Preference:
    prompt: tuple[Message, ...]      # ends with a user turn
    chosen: tuple[Message, ...]      # the completion preferred: assistant-ending turns after the prompt
    rejected: tuple[Message, ...]


def _field(row: dict, name: str, kinds: type | tuple[type, ...] = str):
    if not isinstance(row, dict):
        raise BadRow(f"row: expected a JSON object, got {type(row).__name__}", "missing_field")
    value = row.get(name)
    if not isinstance(value, kinds):
        raise BadRow(f"{name}: missing or not a {getattr(kinds, '__name__', 'list or string')}", "missing_field")
    return value


def _checked(messages: list, field: str, final_assistant: bool = True) -> tuple[Message, ...]:
    try:
        check_messages(messages, field, final_assistant=final_assistant)
    except MessagesError as exc:
        raise BadRow(str(exc), exc.reason) from None
    return tuple({"role": m["role"], "content": m["content"]} for m in messages)


def messages_row(row: dict) -> tuple[Message, ...]:
    return _checked(_field(row, "messages", list), "messages")


def alpaca_row(row: dict) -> tuple[Message, ...]:
    instruction, output = _field(row, "instruction"), _field(row, "output")
    extra = row.get("input") or ""
    if not isinstance(extra, str):
        raise BadRow("input: not a string", "missing_field")
    messages = [{"role": "system", "content": row["system"]}] if row.get("system") else []
    history = row.get("history") or []
    if not isinstance(history, list) or not all(isinstance(t, list) and len(t) == 2 for t in history):
        raise BadRow("history: expected [[user, assistant], ...]", "missing_field")
    for user, assistant in history:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    query = f"{instruction}\n{extra}" if extra.strip() else instruction
    messages += [{"role": "user", "content": query}, {"role": "assistant", "content": output}]
    return _checked(messages, "instruction/output")


_OASST_ROLES = {"prompter": "user", "assistant": "assistant"}


def _best_reply(node: dict) -> dict | None:
    replies = [r for r in node.get("replies") or [] if isinstance(r, dict) and not r.get("deleted")]
    if not replies:
        return None
    return min(replies, key=lambda r: (r.get("rank") is None, r.get("rank") or 0))


def oasst_row(row: dict) -> tuple[Message, ...]:
    node = _field(row, "prompt", dict)
    path = []
    while node is not None:
        if node.get("deleted"):
            break
        role = _OASST_ROLES.get(node.get("role"))
        if role is None:
            raise BadRow(f"prompt: message role {node.get('role')!r} is neither prompter nor assistant", "bad_role")
        path.append({"role": role, "content": node.get("text")})
        node = _best_reply(node)
    while path and path[-1]["role"] != "assistant":
        path.pop()  # a path ending in an unanswered prompt: keep up to the last answer
    if not path:
        raise BadRow("prompt: the tree has no assistant reply", "no_assistant_turn")
    return _checked(path, "prompt")


def _as_messages(value, role: str, field: str) -> list:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list):
        return value
    raise BadRow(f"{field}: missing or not a string or message list", "missing_field")


def preference_row(row: dict) -> Preference:
    if not isinstance(row, dict):
        raise BadRow(f"row: expected a JSON object, got {type(row).__name__}", "missing_field")
    prompt = _as_messages(row.get("prompt"), "user", "prompt")
    checked = _checked(prompt, "prompt", final_assistant=False)
    if checked[-1]["role"] != "user":
        raise BadRow("prompt: must end with a user turn", "roles_out_of_order")
    completions = []
    for name in ("chosen", "rejected"):
        messages = _as_messages(row.get(name), "assistant", name)
        if messages[:len(prompt)] == prompt:
            messages = messages[len(prompt):]  # a full conversation that repeats the prompt
        completions.append(_checked(prompt + messages, name)[len(prompt):])
    if completions[0] == completions[1]:
        raise BadRow("chosen: equals rejected (nothing to prefer)", "chosen_equals_rejected")
    return Preference(checked, completions[0], completions[1])


PARSERS = {"messages": messages_row, "alpaca": alpaca_row, "oasst": oasst_row, "preference": preference_row}
