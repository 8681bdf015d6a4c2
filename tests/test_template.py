"""OpenPrompt's ManualTemplate syntax: each element, rendering to token ids, the bundled files, and errors."""
from __future__ import annotations

import pytest
import torch
from conftest import REPO

from optqa.data import InputExample
from optqa.errors import OptqaError
from optqa.template import ManualTemplate, parse_template

QUESTION = "What is frozen water called?"


@pytest.fixture(scope="module")
def tokenizer(tiny_opt):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_opt))


@pytest.fixture(scope="module")
def embedding(tiny_opt):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_opt)).get_input_embeddings()


def kinds(text: str) -> list[tuple]:
    return [(p.kind, p.value, p.shortenable) for p in parse_template(text)]


def test_placeholder_text_and_mask():
    assert kinds('{"placeholder":"text_a"} Answer: {"mask"}') == [
        ("placeholder", "text_a", True), ("text", " Answer: ", False), ("mask", None, False)]


def test_each_element_and_its_options():
    text = ('{"soft"}{"soft":"init words"} Q: {"placeholder":"text_b", "shortenable": false} '
            '{"meta":"tag", "post_processing": "lower"}{"special":"<eos>"}{"text":"A:"} {"mask"}')
    assert kinds(text) == [
        ("soft", None, False), ("soft", "init words", False), ("text", " Q: ", False),
        ("placeholder", "text_b", False), ("text", " ", False), ("meta", "tag", True), ("special", "<eos>", False),
        ("text", "A:", False), ("text", " ", False), ("mask", None, False)]
    assert parse_template(text)[5].post_processing == "lower"


@pytest.mark.parametrize("mask", ['{"mask"}', "{'mask'}", '{ "mask" }', '{"mask": null}'])
def test_mask_spellings(mask):
    assert kinds("Q " + mask)[-1] == ("mask", None, False)


def test_positions_point_into_the_text():
    text = 'Question: {"placeholder":"text_a"} Answer: {"mask"}'
    assert [p.position for p in parse_template(text)] == [0, text.index("{"), text.index(" Answer"),
                                                           text.index('{"mask"}')]


@pytest.mark.parametrize("text, words", [
    # unclosed brace: the '{' that never closes is at character 0
    ('{"placeholder":"text_a" Answer: {"mask"}', ["unclosed '{' at character 0"]),
    ('Answer} {"mask"}', ["unmatched '}' at character 6"]),
    ('Q: {"placeholder": text_a} {"mask"}', ["cannot parse", "at character 3"]),
    ('{[1]: 2} {"mask"}', ["cannot parse", "at character 0"]),  # used to escape as a TypeError traceback
    ('Q: {"placeholder":"text_a"} {"hint":"x"} {"mask"}', ["unknown key 'hint' at character 28", "known:"]),
    ('{1: "a", "b": 2} {"mask"}', ["unknown key", "at character 0"]),  # keys of mixed types
    ('{"placeholder":"text_c"} {"mask"}', ["placeholder must be text_a or text_b", "'text_c'", "character 0"]),
    ('{"placeholder":"text_a", "meta":"tag"} {"mask"}', ["exactly one of", "character 0"]),
    ('{"meta": 3} {"mask"}', ["meta needs a string at character 0"]),
    ('{"placeholder":"text_a", "post_processing":"upper"} {"mask"}', ["unknown post_processing 'upper'"]),
    ('{"placeholder":"text_a"} Answer:', ['needs a {"mask"}', "found none"]),
    ('Q {"mask"} or {"mask"}', ['a second {"mask"} at character 14']),
    ('{"mask"} {"placeholder":"text_a"}', ['placeholder at character 9 follows the {"mask"} at character 0',
                                           "the inputs must come before the mask (fixed text may follow it)"]),
    ('Q: {"placeholder":"text_a"} A: {"mask"} see {"meta":"tag"}', ["meta at character 44 follows the {\"mask\"}"]),
    ('Q: {"placeholder":"text_a"} A: {"mask"} {"soft"}', ["soft at character 40 follows the {\"mask\"}"]),
])
def test_bad_templates_name_problem_and_position(text, words):
    with pytest.raises(OptqaError) as info:
        parse_template(text, source="my_template.txt")
    message = str(info.value)
    assert message.startswith("my_template.txt: ")
    for word in words:
        assert word in message
    assert "\n" not in message


def test_whitespace_after_the_mask_is_allowed():
    assert kinds('{"placeholder":"text_a"} Answer: {"mask"}  \n\n')[-2:] == [("mask", None, False),
                                                                        ("text", "  \n\n", False)]


COURSE_TEMPLATE = 'question: {"placeholder":"text_a"} answer: {"mask"}.'


def test_text_after_the_mask_is_accepted_and_changes_no_row(tokenizer):
    # OpenPrompt's semantics: teacher forcing puts the target at the mask and the text after it carries no loss,
    # which a causal decoder cannot tell from no text at all; answering, the prompt ends at the mask. So the
    # training row and the prompt are exactly those of the template without the tail.
    from optqa.data import IGNORE_INDEX, LMTokenizerWrapper, collate_for_training

    example = InputExample(guid="q", text_a=QUESTION, tgt_text=["ice"])
    rows = {}
    for text in (COURSE_TEMPLATE, COURSE_TEMPLATE.removesuffix("."), COURSE_TEMPLATE + ' {"special":"<eos>"} bye'):
        wrapper = LMTokenizerWrapper(tokenizer, ManualTemplate(tokenizer, text=text), max_seq_length=64)
        rows[text] = (wrapper.encode(example, target="ice"), wrapper.encode(example))
    (train, prompt), *others = rows.values()
    assert all((t.prompt_ids, t.target_ids, p.prompt_ids) == (train.prompt_ids, train.target_ids, prompt.prompt_ids)
               for t, p in others)
    question = tokenizer(f"question: {QUESTION} answer:", add_special_tokens=False)["input_ids"]
    answer = tokenizer(" ice", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert prompt.prompt_ids == [tokenizer.eos_token_id] + question  # OPT's bos is its eos
    batch = collate_for_training([train], tokenizer.pad_token_id)
    assert batch["input_ids"][0].tolist() == prompt.prompt_ids + answer
    assert batch["labels"][0].tolist() == [IGNORE_INDEX] * len(prompt.prompt_ids) + answer


def test_a_template_file_is_utf8_with_its_byte_order_mark_dropped(tokenizer, tmp_path):
    from optqa.template import read_template_file

    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbf" + COURSE_TEMPLATE.encode())
    assert read_template_file(path) == COURSE_TEMPLATE
    assert ManualTemplate.from_file(tokenizer, path).pieces[0].value == "question: "
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("Réponse: {\"placeholder\":\"text_a\"} {\"mask\"}".encode("latin-1"))
    with pytest.raises(OptqaError) as info:
        read_template_file(latin)
    assert str(info.value) == f"{latin}: not UTF-8 text (byte 0xe9 at offset 1); save the template as UTF-8"


def test_the_format_string_keeps_braces_of_fixed_text_as_text(tokenizer):
    # a text piece holding "{0.__class__}" must reach the prompt as those characters, never be evaluated by format
    template = ManualTemplate(tokenizer, text='{"text":"{0.__class__} {x}"} Q: {"placeholder":"text_a"} A: {"mask"}.')
    prompt = template.prompt_format().format(text_a=QUESTION)
    assert prompt == f"{{0.__class__}} {{x}} Q: {QUESTION} A:"
    rendered = [i for _, piece_ids, _ in template.render(InputExample(text_a=QUESTION)) for i in piece_ids]
    assert tokenizer(prompt)["input_ids"] == [tokenizer.bos_token_id] + rendered  # what the card's snippet runs


def test_render_matches_tokenising_the_whole_prompt(tokenizer):
    """Pieces are tokenised apart, yet word boundaries come out as if the prompt were one string."""
    template = ManualTemplate(tokenizer, text='Question: {"placeholder":"text_a"}\nAnswer:  {"mask"}\n')
    segments = template.render(InputExample(text_a=QUESTION))
    assert [(kind, shortenable) for kind, _, shortenable in segments] == [
        ("text", False), ("placeholder", True), ("text", False)]
    ids = [i for _, piece_ids, _ in segments for i in piece_ids]
    # trailing white space before the mask is left to the answer (targets start with " ")
    assert ids == tokenizer(f"Question: {QUESTION}\nAnswer:", add_special_tokens=False)["input_ids"]


def test_space_around_special_and_soft_pieces(tokenizer, embedding):
    template = ManualTemplate(tokenizer, text='Q: {"special":"<eos>"} {"placeholder":"text_a"} {"soft"} A: {"mask"}',
                              embedding=embedding)
    segments = template.render(InputExample(text_a=QUESTION))
    words = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    # each piece after a special or soft token starts with exactly one space, as it would after a word
    assert segments == [("text", words("Q:"), False), ("special", [tokenizer.eos_token_id], False),
                        ("placeholder", words(" " + QUESTION), True), ("soft", [0], False),
                        ("text", words(" A:"), False)]


def test_meta_post_processing_and_special(tokenizer):
    template = ManualTemplate(tokenizer, text='{"meta":"tag", "post_processing":"lower"}: {"placeholder":"text_a"}'
                                             '{"special":"<eos>"} {"mask"}')
    segments = template.render(InputExample(guid="q7", text_a=QUESTION, meta={"tag": "EASY"}))
    assert segments[0] == ("meta", tokenizer("easy", add_special_tokens=False)["input_ids"], True)
    assert segments[-1] == ("special", [tokenizer.eos_token_id], False)
    with pytest.raises(OptqaError, match=r"meta 'tag', example q8 has \['grade'\]"):
        template.render(InputExample(guid="q8", text_a=QUESTION, meta={"grade": 3}))


def test_unknown_special_token_is_refused_not_mapped_to_unk(tokenizer):
    text = '{"placeholder":"text_a"} {"special":"<sep2>"} {"mask"}'
    with pytest.raises(OptqaError, match=r"at character 25: the tokenizer has no special token '<sep2>'"):
        ManualTemplate(tokenizer, text=text)


def test_soft_tokens_count_and_initialisation(tokenizer, embedding):
    words = tokenizer("science question", add_special_tokens=False)["input_ids"]
    assert len(words) >= 2
    template = ManualTemplate(tokenizer, text='{"soft"} {"soft":"science question"} {"placeholder":"text_a"} '
                                              '{"soft"} {"mask"}', embedding=embedding)
    # one row per bare {"soft"}, one per token of the init words
    assert template.num_soft_tokens == 2 + len(words)
    assert template.soft_embeds.shape == (2 + len(words), embedding.embedding_dim)
    assert template.soft_embeds.requires_grad
    assert torch.equal(template.soft_embeds[1:1 + len(words)].detach(), embedding.weight[words].detach())
    segments = template.render(InputExample(text_a=QUESTION))
    # soft segments carry indices into soft_embeds, in template order
    assert [ids for kind, ids, _ in segments if kind == "soft"] == [[0], list(range(1, 1 + len(words))),
                                                                    [1 + len(words)]]
    with pytest.raises(OptqaError, match="need the backbone's input embedding"):
        ManualTemplate(tokenizer, text='{"soft"} {"placeholder":"text_a"} {"mask"}')


def test_soft_tokens_go_into_the_embeddings_without_a_hook_on_the_backbone(tiny_opt):
    """A {"soft"} template's embeddings replace the token embeddings at its positions in the inputs optqa builds
    (no forward hook on the backbone's embedding: models built on one backbone leave it as it was); a batch
    without its soft_index is refused."""
    from optqa.data import collate_for_generation
    from optqa.model import PromptForGeneration
    from optqa.plm import load_plm

    plm, tokenizer, _, _ = load_plm("opt", str(tiny_opt))
    embedding = plm.get_input_embeddings()
    text = '{"soft"} {"placeholder":"text_a"} {"soft":"science question"} {"mask"}'
    models = [PromptForGeneration(plm, ManualTemplate(tokenizer, text, embedding=embedding)) for _ in range(2)]
    assert not embedding._forward_hooks and not embedding._forward_pre_hooks
    model = models[1].eval()
    encoded = model.wrapper.encode(InputExample(guid=0, text_a=QUESTION), 0)
    batch = collate_for_generation([encoded], tokenizer.pad_token_id)
    with torch.no_grad():
        inputs = model.backbone_inputs(batch["input_ids"], batch["attention_mask"], False, batch["soft_index"])
        plain = embedding(batch["input_ids"])[0]
    soft = batch["soft_index"][0]
    embeds = inputs["inputs_embeds"][0]
    assert "input_ids" not in inputs and soft.max() == model.template.num_soft_tokens - 1
    assert torch.equal(embeds[soft >= 0], model.template.soft_embeds[soft[soft >= 0]].detach())
    assert torch.equal(embeds[soft < 0], plain[soft < 0])
    with pytest.raises(OptqaError, match=r"^this template has \{.soft.\} tokens: pass the batch's soft_index"):
        model.backbone_inputs(batch["input_ids"], batch["attention_mask"], False)


@pytest.mark.parametrize("path", sorted((REPO / "templates").glob("*.txt")), ids=lambda p: p.name)
def test_bundled_templates_parse_and_render(path, tokenizer, embedding):
    template = ManualTemplate.from_file(tokenizer, path, embedding=embedding)
    assert template.pieces[-1].kind == "mask" or template.pieces[-2].kind == "mask"
    segments = template.render(InputExample(text_a=QUESTION))
    placeholder = [ids for kind, ids, _ in segments if kind == "placeholder"]
    assert len(placeholder) == 1 and tokenizer.decode(placeholder[0]).strip() == QUESTION


def test_template_files_and_inline_text(tokenizer, tmp_path):
    with pytest.raises(OptqaError, match="template file not found: .*nope.txt"):
        ManualTemplate.from_file(tokenizer, tmp_path / "nope.txt")
    bad = tmp_path / "bad.txt"
    bad.write_text('{"placeholder":"text_a"} Answer: {"mask"', encoding="utf-8")
    with pytest.raises(OptqaError, match=rf"^{bad}: unclosed '{{' at character 33"):
        ManualTemplate.from_file(tokenizer, bad)
    inline = ManualTemplate(tokenizer, text='Q: {"placeholder":"text_a"} A: {"mask"}')
    assert [p.kind for p in inline.pieces] == ["text", "placeholder", "text", "mask"]


# quotes, a backslash, braces and a character beyond U+FFFF: each broke a card's code or changed its prompt
CARD_TEMPLATE = '{"text": "{0.__class__} \\"quoted\\" C:\\\\dir 🌱"} {"placeholder":"text_a"} Answer: {"mask"}'


def test_both_model_cards_give_the_prompt_optqa_renders(tokenizer):
    import re

    from optqa.data import LMTokenizerWrapper
    from optqa.sharing.card import model_card, prompt_preview

    template = ManualTemplate(tokenizer, text=CARD_TEMPLATE)
    assert template.pieces[0].value == '{0.__class__} "quoted" C:\\dir 🌱'
    question = "Which gas do plants take in from the air?"  # the one the card's preview shows
    optqa_ids = LMTokenizerWrapper(tokenizer, template).encode(InputExample(text_a=question)).prompt_ids
    expected = '{0.__class__} "quoted" C:\\dir 🌱 ' + question + " Answer:"
    assert tokenizer(expected)["input_ids"] == optqa_ids
    manifest = {"delta": {"delta_type": "lora", "lora_r": 8}, "trainable_parameters": 1234, "template": CARD_TEMPLATE,
                "backbone": {"name_or_path": "tiny/opt", "architecture": "OPTForCausalLM", "fingerprint": "sha256:0"}}
    assert prompt_preview(CARD_TEMPLATE, question) == expected
    # the one writer, for the exported PEFT folder and for the pushed repository: the preview it shows, and its
    # code's PROMPT formatted with the question
    for card in (model_card(manifest, base_model="tiny/opt", adapter="adapter", prompt=template.prompt_format()),
                 model_card(manifest, base_model="tiny/opt", adapter="me/card", prompt=template.prompt_format(),
                            repo_id="me/card")):
        assert f"```text\n{expected}\n```" in card
        code = re.search(r"```python\n(.*?)```", card, re.S)
        scope: dict = {}
        exec(next(line for line in code.group(1).splitlines() if line.startswith("PROMPT = ")), scope)
        assert scope["PROMPT"].format(text_a=question) == expected


def test_a_meta_field_shows_as_its_name_in_the_prompt_format(tokenizer):
    template = ManualTemplate(tokenizer, text='{"meta":"topic"}: {"placeholder":"text_a"} A: {"mask"}')
    assert template.prompt_format() == "{topic}: {text_a} A:"  # it was an error: "asks for meta 'topic'"
