"""Prompt formats: how a (system, user) turn becomes the text a model continues, and what ends its answer.

An instruction-tuned model brings its own chat template (`chat`). A pretrained model has none, so it gets
one of ours, written into the tokenizer as its chat template: from then on every stage (extraction,
generation, the filter, heal, the eval, the prompt ladder, the samples) builds its prompts through the one
`tokens.chat_ids`, and the format cannot differ between stages. The format's end-of-answer ids join the
generation config's EOS list, so generation stops there and `generate.stop_ids` knows them.

  chat        the tokenizer's own chat template; its EOS ids end the answer.
  gemma-turn  Gemma's turn markup, the system text folded into the first user turn (as Gemma's own
              template does): `<bos><start_of_turn>user\\n{system}\\n\\n{user}<end_of_turn>\\n<start_of_turn>model\\n`.
              The answer ends at `<end_of_turn>` (or EOS).
  qa          plain text: `<bos>{system}\\n\\nQuestion: {user}\\nAnswer:`. The answer ends at the first blank
              line (a token made only of two or more newlines), at EOS, or where the model starts the next
              turn itself (the text `\\nQuestion:`, several tokens: generation stops on it through the
              generation config's `stop_strings`, and `generate.cut` drops it from the completion).
"""

from __future__ import annotations

from dataclasses import dataclass

from steer_heal.errors import UserError

# Jinja: a leading system message is folded into the first user turn; assistant turns close with the
# format's own end marker, so a multi-turn history reads the way a generated answer ends.
_SPLIT = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set sys = messages[0]['content'] + '\\n\\n' -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set sys = '' -%}{%- set turns = messages -%}{%- endif -%}"
)
GEMMA_TURN = (
    _SPLIT + "{{ bos_token }}"
    "{%- for m in turns -%}"
    "{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else 'user') + '\\n' }}"
    "{{ (sys if loop.first else '') + m['content'] }}{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)
QA = (
    _SPLIT + "{{ bos_token }}{{ sys }}"
    "{%- for m in turns -%}"
    "{%- if m['role'] == 'assistant' -%}{{ 'Answer: ' + m['content'] + '\\n\\n' }}"
    "{%- else -%}{{ 'Question: ' + m['content'] + '\\n' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'Answer:' }}{%- endif -%}"
)


@dataclass(frozen=True)
class PromptFormat:
    name: str
    template: str | None  # a Jinja chat template; None = the tokenizer's own
    stop_markers: tuple[str, ...]  # single tokens that end an answer, besides EOS
    blank_line_stops: bool  # also stop at any token made only of >= 2 newlines
    stop_texts: tuple[str, ...] = ()  # multi-token texts that start the next turn: cut off, never kept


FORMATS = {
    "chat": PromptFormat("chat", None, (), False),
    "gemma-turn": PromptFormat("gemma-turn", GEMMA_TURN, ("<end_of_turn>",), False),
    "qa": PromptFormat("qa", QA, (), True, ("\nQuestion:",)),
}
AUTO = "auto"
CHOICES = (AUTO, *FORMATS)


def resolve(name: str, has_template: bool, spec: str) -> PromptFormat:
    """The format to use: `auto` = the model's own chat template, which a pretrained model lacks."""
    if name not in CHOICES:
        raise UserError(f"--prompt-format {name!r} is not a format; valid: {', '.join(CHOICES)}")
    if name == AUTO:
        if not has_template:
            raise UserError(
                f"--model {spec!r} has no chat template (a pretrained model?): pass --prompt-format "
                f"{' or '.join(n for n in FORMATS if n != 'chat')} to say how its prompts are written"
            )
        name = "chat"
    if name == "chat" and not has_template:
        raise UserError(f"--prompt-format chat: --model {spec!r} has no chat template; valid: gemma-turn, qa")
    return FORMATS[name]


def blank_line_ids(tok) -> list[int]:
    """Ids of the tokens whose text is only newlines, two or more (Gemma: '\\n\\n' up to 31 newlines)."""
    texts = tok.convert_ids_to_tokens(list(range(len(tok))))
    out = []
    for i, t in enumerate(texts):
        s = tok.convert_tokens_to_string([t]) if t is not None else ""
        if len(s) >= 2 and set(s) == {"\n"}:
            out.append(i)
    return out


def marker_id(tok, marker: str) -> int:
    """The id of a stop marker that must be one token of this vocabulary."""
    ids = tok(marker, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise UserError(f"this tokenizer writes the stop marker {marker!r} as {len(ids)} tokens; it needs one")
    return ids[0]


def end_ids(fmt: PromptFormat, tok) -> list[int]:
    """Every id that ends an answer under `fmt`, EOS included."""
    ids = {tok.eos_token_id, *(marker_id(tok, m) for m in fmt.stop_markers)}
    if fmt.blank_line_stops:
        ids |= set(blank_line_ids(tok))
    return sorted(ids)


def id_list(ids: int | list[int] | None) -> list[int]:
    """A generation config's eos_token_id (None, one id or a list) as a list."""
    return [] if ids is None else ([ids] if isinstance(ids, int) else list(ids))


def apply(fmt: PromptFormat, model, tok) -> None:
    """Install `fmt`: its template as the tokenizer's chat template, its end ids in the generation config."""
    if fmt.template is None:
        return
    tok.chat_template = fmt.template
    have = id_list(model.generation_config.eos_token_id)
    model.generation_config.eos_token_id = sorted(set(have) | set(end_ids(fmt, tok)))
    if fmt.stop_texts:
        model.generation_config.stop_strings = list(fmt.stop_texts)


def stop_texts(model) -> list[str]:
    """The multi-token end-of-answer texts the installed format set (none for a chat template)."""
    return list(getattr(model.generation_config, "stop_strings", None) or [])


def trim_at_texts(ids: list[int], tok, texts: list[str]) -> tuple[list[int], bool]:
    """(the ids before the token where the first of `texts` begins, True), or (ids, False) without one.

    Character offsets come from decoding prefixes, so a marker that straddles tokens is found too; the
    token holding the marker's first character is dropped with it."""
    full = tok.decode(ids)
    hits = [full.find(t) for t in texts if t in full]
    if not hits:
        return ids, False
    start = min(hits)
    for k in range(1, len(ids) + 1):
        if len(tok.decode(ids[:k])) > start:
            return ids[: k - 1], True
    return ids, False
