"""The chatml conversation format of Qwen-VL-Chat (upstream qwen_generation_utils: make_context, decode_tokens).

Every piece (role, "\n", content) is encoded on its own, so BPE never merges across pieces, and only the nine
vision tags are special inside user/system text: a typed `<|im_start|>` stays plain text."""
from __future__ import annotations

from typing import Optional, Sequence

DEFAULT_SYSTEM = "You are a helpful assistant."
DEFAULT_MAX_WINDOW = 6144

History = list  # [(query, response), ...]


def _piece(tokenizer, role: str, content: str) -> tuple[str, list[int]]:
    allowed = set(tokenizer.IMAGE_ST)
    nl = tokenizer.encode("\n")
    return f"{role}\n{content}", (tokenizer.encode(role, allowed_special=allowed) + nl
                                  + tokenizer.encode(content, allowed_special=allowed))


def make_context(tokenizer, query: str, history: Optional[Sequence] = None, system: str = "",
                 max_window_size: int = DEFAULT_MAX_WINDOW, chat_format: str = "chatml") -> tuple[str, list[int]]:
    """(raw_text, context ids). History is walked newest first; a turn is kept while
    len(system) + len(turn) + len(kept) < max_window_size, and the first turn that does not fit drops all older ones."""
    history = [] if history is None else history
    if chat_format == "raw":
        return query, tokenizer.encode(query)
    if chat_format != "chatml":
        raise NotImplementedError(f"Unknown chat format {chat_format!r}")
    im_start, im_end = "<|im_start|>", "<|im_end|>"
    start, end, nl = [tokenizer.im_start_id], [tokenizer.im_end_id], tokenizer.encode("\n")

    system_text, system_ids = _piece(tokenizer, "system", system)
    system_tokens = start + system_ids + end
    raw_text, context = "", []
    for turn_query, turn_response in reversed(list(history)):
        q_text, q_ids = _piece(tokenizer, "user", turn_query)
        q_tokens = start + q_ids + end
        if turn_response is not None:
            r_text, r_ids = _piece(tokenizer, "assistant", turn_response)
            turn = nl + q_tokens + nl + start + r_ids + end
            turn_text = f"\n{im_start}{q_text}{im_end}\n{im_start}{r_text}{im_end}"
        else:
            turn = nl + q_tokens + nl
            turn_text = f"\n{im_start}{q_text}{im_end}\n"
        if len(system_tokens) + len(turn) + len(context) < max_window_size:
            context = turn + context
            raw_text = turn_text + raw_text
        else:
            break
    context = system_tokens + context
    raw_text = f"{im_start}{system_text}{im_end}" + raw_text
    context += nl + start + _piece(tokenizer, "user", query)[1] + end + nl + start + tokenizer.encode("assistant") + nl
    raw_text += f"\n{im_start}user\n{query}{im_end}\n{im_start}assistant\n"
    return raw_text, context


def stop_words_ids(tokenizer, chat_format: str = "chatml") -> list[list[int]]:
    if chat_format == "chatml":
        return [[tokenizer.im_end_id], [tokenizer.im_start_id]]
    if chat_format == "raw":
        return [tokenizer.encode("Human:"), [tokenizer.eod_id]]
    raise NotImplementedError(f"Unknown chat format {chat_format!r}")


def decode_response(tokens: Sequence[int], tokenizer, raw_text_len: int, context_length: int,
                    chat_format: str = "chatml", errors: str = "replace") -> str:
    """The assistant's text: generated ids up to the first <|im_start|>/<|im_end|>, decoded with the context and
    cut after the raw context text (upstream decode_tokens)."""
    tokens = [int(t) for t in tokens]
    if chat_format == "chatml":
        stop = (tokenizer.im_start_id, tokenizer.im_end_id)
        # as upstream: when no stop id is generated the index ends on the last token, which is then dropped
        cut = context_length
        for cut in range(context_length, len(tokens)):
            if tokens[cut] in stop:
                break
        return tokenizer.decode(tokens[:cut], errors=errors)[raw_text_len:].strip()
    if chat_format == "raw":
        text = tokenizer.decode(tokens, errors=errors)[raw_text_len:]
        text = text.replace("<|endoftext|>", "").strip()
        return text.split("<|endoftext|>")[0].strip()
    raise NotImplementedError(f"Unknown chat format {chat_format!r}")
