"""Prompt formats for models without a chat template: prompt -> ids -> completion boundaries in every stage
that builds a prompt (extraction, generation, the eval, the references), the refusal without a format, and
the stop rules (a blank line, the next-turn text, Gemma's <end_of_turn>). On SmolLM2's tokenizer with its
template removed, and on the embedded Gemma 3 270M's real tokenizer."""

from __future__ import annotations

import pytest
import torch

from steer_heal import data, evaluate, extract, formats, models
from steer_heal.errors import UserError
from steer_heal.generate import Row, Sampling, cut, generate, stop_ids
from steer_heal.tokens import answer_ids, chat_ids, with_prefill


@pytest.fixture(scope="module")
def bare_tok_dir(tmp_path_factory):
    """SmolLM2's tokenizer saved without its chat template: what a pretrained model ships."""
    _, tok = models.load("tiny-random")
    tok.chat_template = None
    d = tmp_path_factory.mktemp("bare_tok")
    tok.save_pretrained(d)
    (d / "chat_template.jinja").unlink(missing_ok=True)
    return d


@pytest.fixture(scope="module")
def qa_model(bare_tok_dir):
    torch.manual_seed(0)
    return models.load("tiny-random", tokenizer=str(bare_tok_dir), prompt_format="qa")


@pytest.fixture(scope="module")
def gemma_tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(models.model_source(models.GEMMA270M)[0])


def test_a_model_without_a_template_is_refused_in_one_line_naming_the_flag(bare_tok_dir):
    with pytest.raises(UserError) as e:
        models.load("tiny-random", tokenizer=str(bare_tok_dir))
    msg = str(e.value)
    assert "\n" not in msg and "--prompt-format" in msg and "no chat template" in msg
    assert "gemma-turn" in msg and "qa" in msg
    with pytest.raises(UserError, match="--prompt-format chat"):
        models.load("tiny-random", tokenizer=str(bare_tok_dir), prompt_format="chat")
    with pytest.raises(UserError, match="valid: auto, chat, gemma-turn, qa"):
        formats.resolve("plain", True, "x")


def test_a_model_without_a_template_is_accepted_under_a_format(qa_model):
    model, tok = qa_model
    assert tok.chat_template == formats.QA
    ids = chat_ids(tok, "Is it fair?", "Be brief.")
    text = tok.decode(ids)
    assert text == f"{tok.bos_token}Be brief.\n\nQuestion: Is it fair?\nAnswer:"
    assert (
        chat_ids(tok, "Is it fair?")
        == tok(tok.bos_token + "Question: Is it fair?\nAnswer:", add_special_tokens=False).input_ids
    )
    # the format's end ids joined the generation config, so generation and stop_ids see them
    assert set(formats.blank_line_ids(tok)) <= set(stop_ids(model, tok))
    assert tok.eos_token_id in stop_ids(model, tok)


def test_qa_prompts_in_every_stage(qa_model):
    model, tok = qa_model
    persona = data.persona("care_vs_authority")
    # extraction: the persona's system text, folded above the question, pos and neg differing only there
    pos, neg = (chat_ids(tok, "Hello.", persona.system(b)) for b in (True, False))
    assert tok.decode(pos).endswith("\n\nQuestion: Hello.\nAnswer:") and persona.system(True) in tok.decode(pos)
    acts = extract.last_token_acts(model, [pos, neg], [0], tok.pad_token_id, 2, "acts")
    assert acts[0].shape[0] == 2
    # the eval: the prompt already ends with its answer cue, so the prefill is not written twice
    pre = tok(evaluate.PREFILL, add_special_tokens=False).input_ids
    head = chat_ids(tok, evaluate.prompt_text("A scenario.", False))
    item = with_prefill(head, pre)
    assert item == head and tok.decode(item).count("Answer:") == 1
    assert tok.decode(item).endswith("Answer with one option only.\nAnswer:")
    chat_head = [1, 2, 3]
    assert with_prefill(chat_head, pre) == chat_head + pre  # a chat template's assistant header gets it
    # reference answers continue "Answer:" after a space, as a generated answer does
    assert tok.decode(chat_ids(tok, "Q?") + answer_ids(tok, "Yes.")).endswith("Answer: Yes.")


def test_qa_generation_stops_at_the_next_turn_and_drops_it(qa_model):
    model, tok = qa_model
    stops = stop_ids(model, tok)
    texts = formats.stop_texts(model)
    assert texts == ["\nQuestion:"]
    answer = tok(" Help her sit down.", add_special_tokens=False).input_ids
    nxt = tok("\nQuestion: What now?", add_special_tokens=False).input_ids
    ids, eos = cut(answer + nxt, stops, tok, texts)
    assert ids == answer and eos
    blank = tok("\n\n", add_special_tokens=False).input_ids
    assert len(blank) == 1 and blank[0] in stops
    ids, eos = cut(answer + blank + nxt, stops, tok, texts)
    assert ids == answer + blank and eos  # a blank line ends the answer and stays, like a chat EOS
    ids, eos = cut(answer, stops, tok, texts)
    assert ids == answer and not eos


def test_qa_generate_returns_completions_inside_the_answer(qa_model):
    model, tok = qa_model
    prompt = chat_ids(tok, "What should I do?")
    rows = [Row(0, "What should I do?", prompt, 0.0, 0.0)] * 3
    for c in generate(model, tok, rows, sampling=Sampling(24, do_sample=True), batch_size=3, seed=1):
        assert c.prompt_ids == prompt
        assert "\nQuestion:" not in tok.decode(c.ids)
        assert c.hit_eos == (bool(c.ids) and (c.ids[-1] in stop_ids(model, tok) or len(c.ids) < 24))


def test_gemma_tokenizer_formats(gemma_tok):
    tok = gemma_tok
    assert tok.chat_template is None  # the pretrained model ships none
    model = type("M", (), {"generation_config": type("G", (), {"eos_token_id": 1, "stop_strings": None})()})()
    formats.apply(formats.FORMATS["gemma-turn"], model, tok)
    ids = chat_ids(tok, "Hi.", "Be kind.")
    assert tok.decode(ids) == "<bos><start_of_turn>user\nBe kind.\n\nHi.<end_of_turn>\n<start_of_turn>model\n"
    assert ids.count(tok.bos_token_id) == 1
    end = tok.convert_tokens_to_ids("<end_of_turn>")
    assert end in model.generation_config.eos_token_id and 1 in model.generation_config.eos_token_id
    formats.apply(formats.FORMATS["qa"], model, tok)
    assert tok.decode(chat_ids(tok, "Hi.")) == "<bos>Question: Hi.\nAnswer:"
    blank = formats.blank_line_ids(tok)
    assert tok.convert_tokens_to_ids("\n\n") in blank and tok.convert_tokens_to_ids("\n") not in blank
    # the eval's answer tokens continue "Answer:" as single distinct tokens, so one forward pass scores them
    first = [ids[0] for ids in evaluate.label_ids(tok)]
    assert len(set(first)) == len(first)


def test_compiled_decode_ends_a_qa_answer_where_eager_does(qa_model):
    """The compiled loop does not stop on the next-turn text; `cut` drops it afterwards, so greedy completions
    (ids and hit_eos) are the eager path's."""
    from steer_heal import decode

    model, tok = qa_model
    decode.decoder(model, backend="aot_eager")
    prompts = ["What should I do?", "Is it fair to the others?"]
    rows = [Row(i, p, chat_ids(tok, p), 0.0, 0.0) for i, p in enumerate(prompts)]
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        greedy = Sampling(16, do_sample=False)
        eager = generate(model, tok, rows, sampling=greedy, batch_size=2, decode="eager")
        comp = generate(model, tok, rows, sampling=greedy, batch_size=2, decode="compiled")
    finally:
        torch.set_num_threads(n)
    assert [(c.ids, c.hit_eos) for c in comp] == [(c.ids, c.hit_eos) for c in eager]
