"""Chat: a steered and an unsteered conversation that continue side by side.

Every turn sends one user message to two conversations that share all user messages and keep
their own replies. Row 0 of one batch continues the steered history with the request's vectors,
row 1 the baseline history unsteered; once the replies differ so do the two prompts, and the
rows are left-padded to one length (`generate.stream_rows(row_ids=...)`). The whole conversation
goes through the chat template (`generate.conversation_ids`). Validation, the model lock, the
layer checks and the out-of-memory retry are /steer's own (`steering/api.py`); each history is
bounded by `chat_turns` and `chat_chars` (`steering/limits.py`) and, after the template, by the
model's token limits. Histories are lists of {"role", "content"} messages, the format
`gr.Chatbot` shows. No gradio here.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator, Sequence
from threading import Event

from steering import api, estimate, generate, limits
from steering import engine as eng
from steering.errors import InputError
from steering.loaded import LoadedModel
from steering.loader import Attempt

_D = {name: limit.default for name, limit in limits.LIMITS.items()}
HISTORIES = ("history_steered", "history_baseline", "history_prompted")  # the fields, in batch-row order
MAX_TURNS = int(limits.LIMITS["chat_turns"].maximum)
MAX_CHARS = int(limits.LIMITS["chat_chars"].maximum)


def check_history(history, field: str, message: str) -> list[dict]:
    """A history that can take `message`: {"role", "content"} messages alternating user and
    assistant from a user message to the assistant's last reply; with the new exchange at most
    `chat_turns` exchanges and `chat_chars` characters. Refused with the field of the first fault."""
    if not isinstance(history, list):
        raise InputError(field, 'must be a list of {"role", "content"} messages (empty for a new chat)')
    if len(history) // 2 + 1 > MAX_TURNS:
        raise InputError(
            field,
            f"holds {len(history) // 2} exchanges; with the new message that is {len(history) // 2 + 1}, and a chat "
            f"holds {MAX_TURNS} at most. Clear the chat to go on",
        )
    for i, item in enumerate(history):
        role = "user" if i % 2 == 0 else "assistant"
        if not isinstance(item, dict):
            raise InputError(f"{field}[{i}]", f'must be a {{"role", "content"}} message; got {limits.shorten(item)}')
        unknown = sorted(set(map(str, item)) - {"role", "content"})
        if unknown:
            raise InputError(f"{field}[{i}]", f'has an unknown key {unknown[0]!r}; a message is {{"role", "content"}}')
        if item.get("role") != role:
            raise InputError(
                f"{field}[{i}].role",
                f"must be {role!r} (messages alternate user, assistant, starting with user); "
                f"got {limits.shorten(item.get('role'))}",
            )
        content = item.get("content")
        if role == "user":
            limits.check_text(content, f"{field}[{i}].content", "prompt_chars")
        elif not isinstance(content, str):  # a reply may be empty (the model can stop at once)
            raise InputError(f"{field}[{i}].content", f"must be a text; got {limits.shorten(content)}")
        else:
            _check_unicode(content, f"{field}[{i}].content")
    if len(history) % 2:
        raise InputError(field, "ends with a user message; a history ends with the assistant's reply")
    chars = sum(len(m["content"]) for m in history) + len(message)
    if chars > MAX_CHARS:
        raise InputError(
            field, f"with the new message holds {chars} characters; the limit is {MAX_CHARS}. Clear the chat to go on"
        )
    return [{"role": m["role"], "content": m["content"]} for m in history]


def _check_unicode(text: str, field: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: no tokenizer can read it
        raise InputError(field, "contains a character that is not valid Unicode (a lone surrogate)") from None


def _check_side_by_side(steered: Sequence[dict], baseline: Sequence[dict], field: str = "history_baseline") -> None:
    """Both histories hold the same user messages: they are one chat seen twice."""
    if len(steered) != len(baseline):
        raise InputError(
            field,
            f"holds {len(baseline)} messages and history_steered {len(steered)}; the conversations "
            "continue side by side, with the same user messages",
        )
    for i in range(0, len(steered), 2):
        if steered[i]["content"] != baseline[i]["content"]:
            raise InputError(f"{field}[{i}].content", "differs from history_steered's user message")


def _with_instruction(conversation: Sequence[dict], instruction: str) -> list[dict]:
    """The prompted conversation as the model reads it: every user message followed by the
    instruction (`generate.prompted_prompt`); its history keeps the plain messages."""
    return [
        {**m, "content": generate.prompted_prompt(m["content"], instruction)} if m["role"] == "user" else m
        for m in conversation
    ]


def _conversation_fits(conversations: Sequence[list[dict]], new_tokens: int, texts) -> api.Fits:
    """Each conversation (after the chat template) + new tokens against the model's limit for a
    2-row compare (3 rows with the prompted conversation: a prompted compare's limit), and each
    steering text, as /steer checks its prompt."""
    kind = "prompted" if len(conversations) > 2 else "compare"
    text_fits = api._token_fits(kind, texts=texts)

    def check(loaded: LoadedModel) -> None:
        limit, why = api._token_limit(loaded, kind)
        for field, conversation in zip(HISTORIES, conversations):
            count = len(generate.conversation_ids(loaded.tokenizer, conversation))
            if count + new_tokens > limit:
                raise InputError(
                    field if len(conversation) > 1 else "message",
                    f"with the new message this conversation is {count} tokens (after the chat template); with "
                    f"{new_tokens} new tokens that is {count + new_tokens} per row, over the limit of {limit} for "
                    f"a {estimate.KIND_WORDS[kind]} on {loaded.model_id} ({why}). Clear the chat, shorten the "
                    "message or ask for "
                    f"fewer new tokens{api._MORE}",
                )
        text_fits(loaded)

    return check


def chat_stream(
    message: str,
    history_steered: list[dict],
    history_baseline: list[dict],
    vectors: list[dict],
    max_new_tokens: int = _D["max_new_tokens"],
    temperature: float = _D["temperature"],
    top_p: float = _D["top_p"],
    seed: int = _D["seed"],
    capture_mode: str = eng.DEFAULT_CAPTURE_MODE,
    prompted: bool = False,
    history_prompted: list[dict] | None = None,
    *,
    stop: Event | None = None,
) -> Iterator[dict]:
    """Streaming form of `chat`: yields the result with the replies so far (and both histories
    with them), then the final one. A stopped turn keeps the replies it had."""
    message = limits.check_text(message, "message", "prompt_chars")
    steered_history = check_history(history_steered, "history_steered", message)
    baseline_history = check_history(history_baseline, "history_baseline", message)
    _check_side_by_side(steered_history, baseline_history)
    sampling = generate.check_sampling(max_new_tokens, temperature, top_p, seed)
    specs = api._parse_vectors(vectors)
    capture_mode = api._check_capture_mode(capture_mode)
    asked = {"role": "user", "content": message}
    conversations = [steered_history + [asked], baseline_history + [asked]]
    instruction = None
    if limits.check_bool(prompted, "prompted"):
        prompted_history = check_history(history_prompted or [], "history_prompted", message)
        _check_side_by_side(steered_history, prompted_history, "history_prompted")
        instruction = generate.prompt_instruction(specs)
        conversations.append(prompted_history + [asked])

    def work(attempt: Attempt) -> Iterator[dict]:
        loaded = attempt.loaded
        mapped, base = api._on_model(attempt, specs)
        read = conversations[:2] + [_with_instruction(c, instruction) for c in conversations[2:]]
        row_ids = [generate.conversation_ids(loaded.tokenizer, c) for c in read]
        rows = generate.compare_rows(mapped, True, instruction is not None)
        for update in generate.generate_rows(
            eng.engine_for(loaded), "", rows, sampling, one_row=attempt.one_row, stop=stop,
            capture_mode=capture_mode, row_ids=row_ids,
        ):  # fmt: skip
            replies = [{"role": "assistant", "content": text} for text in update.texts]
            third = {"prompted": None, "history_prompted": None, "instruction": instruction}
            if instruction is not None:
                third.update(prompted=update.texts[2], history_prompted=conversations[2] + [replies[2]])
            yield {
                **base,
                "steered": update.texts[0],
                "baseline": update.texts[1],
                "history_steered": conversations[0] + [replies[0]],
                "history_baseline": conversations[1] + [replies[1]],
                **third,
                "tokens": [len(ids) for ids in update.token_ids],  # generated so far, per row
                "done": update.done,
            }

    layers, sizes = api._vector_checks(specs)
    read = conversations[:2] + [_with_instruction(c, instruction) for c in conversations[2:]]
    fits = _conversation_fits(read, sampling.max_new_tokens, api._texts(specs))
    yield from api._stream("chat", layers, work, sizes, fits)


def chat(
    message: str,
    history_steered: list[dict],
    history_baseline: list[dict],
    vectors: list[dict],
    max_new_tokens: int = _D["max_new_tokens"],
    temperature: float = _D["temperature"],
    top_p: float = _D["top_p"],
    seed: int = _D["seed"],
    capture_mode: str = eng.DEFAULT_CAPTURE_MODE,
    prompted: bool = False,
    history_prompted: list[dict] | None = None,
) -> dict:
    """Continue a steered and an unsteered conversation side by side by one message.

    A history is a list of {"role": "user" | "assistant", "content": text} messages alternating
    from a user message to the assistant's reply; with the new message each holds at most 16
    exchanges and 24000 characters. Both replies are rows of one batch.

    Args:
        message: the new user message, sent to both conversations.
        history_steered: the steered conversation so far ([] starts a chat): the previous answer's history_steered.
        history_baseline: the unsteered conversation so far: the previous answer's history_baseline.
            It holds the same user messages as history_steered, with the baseline's own replies.
        vectors: the steered conversation's vectors, as /steer takes them (text, pair or direction; coeff; layer).
            Send the same vectors every turn to keep one steering; [] gives two unsteered replies.
        max_new_tokens: tokens to generate per reply, 1 to 512.
        temperature: 0 for greedy decoding, up to 2.
        top_p: nucleus sampling threshold in (0, 1].
        seed: random seed (0 to 2**31-1); each conversation samples with its own generator.
        capture_mode: how text vectors are captured: contexts (default), bos-neutral, bos, or stock
            (comparison only).
        prompted: also continue a third, unsteered conversation whose user messages are each read
            with an instruction to bring in the steering text appended (as /steer's prompted row:
            "In your answer, talk about {text}."), as a third row of the batch. Needs an enabled
            text or pair vector with a non-zero coefficient.
        history_prompted: with prompted, that conversation so far (the previous answer's
            history_prompted; None or [] starts it): the same user messages as history_steered,
            kept without the instruction, and its own replies.

    Returns:
        {"steered", "baseline" (the two new replies), "history_steered", "history_baseline" (each
        history with the new message and its reply), "model", "quant", "device", "layers", "tokens"
        (new tokens per reply: [steered, baseline(, prompted)]), "prompted", "history_prompted" and
        "instruction" (None without prompted), "fallback" (None, or the downgrade event when this
        request ran out of memory)}.
    """
    stream = chat_stream(
        message, history_steered, history_baseline, vectors, max_new_tokens, temperature, top_p, seed, capture_mode,
        prompted, history_prompted,
    )  # fmt: skip
    result = collections.deque(stream, maxlen=1)[0]
    result.pop("done", None)
    return result
