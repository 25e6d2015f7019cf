"""Templates and label masking against the official LLaVA / LLaVA-Mini formats.

The expected strings below are written out from official ``conv.get_prompt()`` (LLaVA
``conv_vicuna_v1`` / ``conv_llava_plain``, LLaVA-Mini ``llava_llama_3_1``) for the same records.
"""
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from lm_mini.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from lm_mini.data.conversation import (
    Template, build_prompt, render, template_corpus, tokenize_conversation,
)
from lm_mini.data.errors import SampleError
from lm_mini.data.tokenizer import train_tokenizer
from lm_mini.registry import TEMPLATES

IMG = IMAGE_TOKEN_INDEX
VICUNA_SYS = ("A chat between a curious user and an artificial intelligence assistant. "
              "The assistant gives helpful, detailed, and polite answers to the user's questions.")
LLAMA3_SYS = ("You are a helpful language and vision assistant. You are able to understand the visual "
              "content that the user provides, and assist the user with a variety of tasks using natural language.")
L3_HEAD = f"<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{LLAMA3_SYS}<|eot_id|>"


def L3(role, text):
    return f"<|start_header_id|>{role}<|end_header_id|>\n\n{text}"


def turns(*pairs):
    return [{"from": f, "value": v} for f, v in pairs]


SINGLE = turns(("human", "<image>\nWhat colour is the square?"), ("gpt", "Red."))
MULTI = turns(("human", "<image>\nHow many circles?"), ("gpt", "Three."),
              ("human", "Where is the triangle?"), ("gpt", "At the top left."))
TEXT = turns(("human", "Name a primary colour."), ("gpt", "Blue."))
CAPTION = turns(("human", "Render a caption for <image>"), ("gpt", "a red square and a blue circle"))


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
    records = [(SINGLE, True), (MULTI, True), (TEXT, False), (CAPTION, True)] * 10
    return train_tokenizer(template_corpus(records), tmp_path_factory.mktemp("tok"), vocab_size=1024)


def layout(tok, parts):
    """Expected (input_ids, labels) from (piece, trained) parts; a piece is text, IMG or 'BOS'."""
    ids, labels = [], []
    for piece, trained in parts:
        if piece == "BOS":
            new = [tok.bos_token_id]
        elif piece == IMG:
            new = [IMG]
        else:
            new = tok(piece, add_special_tokens=False)["input_ids"]
        ids += new
        labels += new if trained else [IGNORE_INDEX] * len(new)
    return ids, labels


def decode_with_image(tok, ids):
    return "<image>".join(tok.decode(ids[i:j]) for i, j in _chunks(ids))


def _chunks(ids):
    cuts = [-1] + [k for k, t in enumerate(ids) if t == IMG] + [len(ids)]
    return [(a + 1, b) for a, b in zip(cuts, cuts[1:])]


def label_spans(tok, labels):
    """Decoded runs of trained labels."""
    spans, run = [], []
    for t in labels + [IGNORE_INDEX]:
        if t == IGNORE_INDEX:
            if run:
                spans.append(tok.decode(run))
            run = []
        else:
            run.append(t)
    return spans


# --------------------------------------------------------------------------- rendering
def test_templates_registered():
    assert {"plain", "vicuna_v1", "llama3", "llava_llama_3_1"} <= set(TEMPLATES.names())
    assert all(isinstance(TEMPLATES.get(n), Template) for n in ("plain", "vicuna_v1", "llama3", "llava_llama_3_1"))


def test_render_matches_official_strings():
    assert render(MULTI, "vicuna_v1", True) == (
        f"{VICUNA_SYS} USER: <image>\nHow many circles? ASSISTANT: Three.</s>"
        "USER: Where is the triangle? ASSISTANT: At the top left.</s>")
    assert render(MULTI, "llama3", True) == (
        L3_HEAD + L3("user", "<image>\nHow many circles?<|eot_id|>") + L3("assistant", "Three.<|eot_id|>")
        + L3("user", "Where is the triangle?<|eot_id|>") + L3("assistant", "At the top left.<|eot_id|>"))
    # plain keeps only the image of the human turn (official preprocess_plain).
    assert render(CAPTION, "plain", True) == "<image>a red square and a blue circle\n"
    # Generation prompts end with the assistant prefix, as official get_prompt() with a None message.
    assert render(SINGLE, "vicuna_v1", True, generation=True) == (
        f"{VICUNA_SYS} USER: <image>\nWhat colour is the square? ASSISTANT:")
    assert render(SINGLE, "llama3", True, generation=True) == (
        L3_HEAD + L3("user", "<image>\nWhat colour is the square?<|eot_id|>") + L3("assistant", ""))


# --------------------------------------------------------------------------- golden layouts
GOLDEN = {
    ("vicuna_v1", "single"): (SINGLE, True, [
        ("BOS", False), (f"{VICUNA_SYS} USER: ", False), (IMG, False),
        ("\nWhat colour is the square? ASSISTANT:", False), (" Red.</s>", True)]),
    ("vicuna_v1", "multi"): (MULTI, True, [
        ("BOS", False), (f"{VICUNA_SYS} USER: ", False), (IMG, False), ("\nHow many circles? ASSISTANT:", False),
        (" Three.</s>", True), ("USER: Where is the triangle? ASSISTANT:", False), (" At the top left.</s>", True)]),
    ("vicuna_v1", "text"): (TEXT, False, [
        ("BOS", False), (f"{VICUNA_SYS} USER: Name a primary colour. ASSISTANT:", False), (" Blue.</s>", True)]),
    ("llama3", "single"): (SINGLE, True, [
        (L3_HEAD + L3("user", ""), False), (IMG, False),
        ("\nWhat colour is the square?<|eot_id|>" + L3("assistant", ""), False), ("Red.<|eot_id|>", True)]),
    ("llama3", "multi"): (MULTI, True, [
        (L3_HEAD + L3("user", ""), False), (IMG, False),
        ("\nHow many circles?<|eot_id|>" + L3("assistant", ""), False), ("Three.<|eot_id|>", True),
        (L3("user", "Where is the triangle?<|eot_id|>") + L3("assistant", ""), False),
        ("At the top left.<|eot_id|>", True)]),
    ("llama3", "text"): (TEXT, False, [
        (L3_HEAD + L3("user", "Name a primary colour.<|eot_id|>") + L3("assistant", ""), False),
        ("Blue.<|eot_id|>", True)]),
    ("plain", "caption"): (CAPTION, True, [
        ("BOS", False), (IMG, False), ("a red square and a blue circle\n", True)]),
}


@pytest.mark.parametrize("key", list(GOLDEN), ids=lambda k: "-".join(k))
def test_golden_layout(tok, key):
    template, _ = key
    conversations, has_media, parts = GOLDEN[key]
    sample = tokenize_conversation(conversations, tok, template, max_length=2048, has_media=has_media)
    ids, labels = layout(tok, parts)
    assert sample.input_ids == ids
    assert sample.labels == labels
    assert not sample.unaligned and not sample.truncated
    assert sample.input_ids.count(IMG) == (1 if has_media else 0)
    # Decoded: the official prompt string, BOS id first where the template adds one.
    bos = "<s>" if template != "llama3" else ""
    assert decode_with_image(tok, sample.input_ids) == bos + render(conversations, template, has_media)


@pytest.mark.parametrize("template,eot", [("vicuna_v1", "</s>"), ("llama3", "<|eot_id|>"), ("plain", "\n")])
def test_labels_are_exactly_the_answers_plus_end_of_turn(tok, template, eot):
    records = {"plain": [(CAPTION, True)], "vicuna_v1": [(MULTI, True), (TEXT, False)], "llama3": [(MULTI, True), (TEXT, False)]}
    space = " " if template == "vicuna_v1" else ""
    for conversations, has_media in records[template]:
        sample = tokenize_conversation(conversations, tok, template, 2048, has_media)
        answers = [t["value"] for t in conversations if t["from"] == "gpt"]
        assert label_spans(tok, sample.labels) == [space + a + eot for a in answers]
        trained = [k for k, t in enumerate(sample.labels) if t != IGNORE_INDEX]
        assert all(sample.labels[k] == sample.input_ids[k] for k in trained)
        if template != "plain":  # the end-of-turn token is a single trained special token
            assert sample.labels[trained[-1]] == tok.convert_tokens_to_ids(eot)


def test_stop_token_ids(tok):
    assert TEMPLATES.get("vicuna_v1").stop_token_ids(tok) == [tok.eos_token_id]
    # Llama-3.1 ends a turn with <|eot_id|>, and may end with <|eom_id|> / <|end_of_text|>: official
    # conv_llava_llama_3_1.stop_token_ids = [128009, 128008, 128001]; ours has no <|eom_id|> token (left out)
    ends = [tok.convert_tokens_to_ids("<|eot_id|>"), tok.convert_tokens_to_ids("<|end_of_text|>")]
    for name in ("llama3", "llava_llama_3_1"):
        assert TEMPLATES.get(name).stop_token_ids(tok) == ends
    llama31 = _llama3_tokenizer(tok, extra=["<|eom_id|>"])
    eom = llama31.convert_tokens_to_ids("<|eom_id|>")
    assert eom != llama31.unk_token_id and TEMPLATES.get("llava_llama_3_1").stop_token_ids(llama31) == ends[:1] + [eom] + ends[1:]


# --------------------------------------------------------------------------- placeholders
def test_missing_placeholder_is_inserted_at_start_of_first_human_turn(tok):
    bare = turns(("human", "What colour is the square?"), ("gpt", "Red."))
    moved = turns(("human", "What colour is the square? <video>"), ("gpt", "Red."))
    expected = tokenize_conversation(SINGLE, tok, "vicuna_v1", 2048, True)
    assert tokenize_conversation(bare, tok, "vicuna_v1", 2048, True) == expected
    # A placeholder elsewhere in the turn (or <video>) moves to the front, like official preprocess_multimodal.
    assert tokenize_conversation(moved, tok, "vicuna_v1", 2048, True) == expected


@pytest.mark.parametrize("conversations,has_media,count", [
    (turns(("human", "<image>\n<image>\nCompare."), ("gpt", "Same.")), True, 2),
    (turns(("human", "<image>\nA?"), ("gpt", "B."), ("human", "<video> C?"), ("gpt", "D.")), True, 2),
    (turns(("human", "<image>\nWhat is this?"), ("gpt", "A square.")), False, 1),
    (turns(("system", "You may see an <image>."), ("human", "Hi"), ("gpt", "Hello")), False, 1),
    (turns(("system", "Look at the <image>."), ("human", "<image>\nWhat?"), ("gpt", "A dog.")), True, 1),
])
def test_placeholder_mismatch(tok, conversations, has_media, count):
    with pytest.raises(SampleError, match=rf"sample-7.*{count}") as err:
        tokenize_conversation(conversations, tok, "llama3", 2048, has_media, sample_id="sample-7")
    assert err.value.reason == "placeholder_mismatch" and err.value.sample_id == "sample-7"


# --------------------------------------------------------------------------- record validation
@pytest.mark.parametrize("conversations", [
    [],
    "not a list",
    [{"from": "human"}, {"from": "gpt", "value": "x"}],
    [{"value": "hi"}, {"from": "gpt", "value": "x"}],
    turns(("narrator", "hi"), ("gpt", "x")),
    turns(("human", "a"), ("human", "b"), ("gpt", "c")),
    turns(("human", "a"), ("gpt", "b"), ("gpt", "c")),
    turns(("gpt", "only an answer")),
    turns(("human", "a"), ("system", "late system"), ("gpt", "b")),
])
def test_malformed_records(tok, conversations):
    with pytest.raises(SampleError, match="rec-1") as err:
        tokenize_conversation(conversations, tok, "vicuna_v1", 2048, False, sample_id="rec-1")
    assert err.value.reason == "malformed_record"


def test_plain_needs_exactly_one_exchange(tok):
    with pytest.raises(SampleError) as err:
        tokenize_conversation(MULTI, tok, "plain", 2048, True)
    assert err.value.reason == "malformed_record"


def test_leading_gpt_turn_is_skipped_like_official(tok):
    with_lead = turns(("gpt", "Hello!"), *[(t["from"], t["value"]) for t in TEXT])
    assert tokenize_conversation(with_lead, tok, "vicuna_v1", 2048, False) == tokenize_conversation(TEXT, tok, "vicuna_v1", 2048, False)


def test_role_aliases_and_system_turn(tok):
    aliased = turns(("user", "Name a primary colour."), ("assistant", "Blue."))
    assert tokenize_conversation(aliased, tok, "llama3", 2048, False) == tokenize_conversation(TEXT, tok, "llama3", 2048, False)
    model = turns(("USER", "Name a primary colour."), ("model", "Blue."))
    assert render(model, "vicuna_v1", False) == render(TEXT, "vicuna_v1", False)
    with_system = turns(("system", "Answer briefly."), *[(t["from"], t["value"]) for t in TEXT])
    assert render(with_system, "vicuna_v1", False) == "Answer briefly. USER: Name a primary colour. ASSISTANT: Blue.</s>"
    assert render(with_system, "llama3", False).startswith(
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nAnswer briefly.<|eot_id|>")


# --------------------------------------------------------------------------- truncation, alignment
def test_too_long_is_truncated(tok):
    full = tokenize_conversation(MULTI, tok, "vicuna_v1", 2048, True)
    cut = tokenize_conversation(MULTI, tok, "vicuna_v1", len(full.input_ids) - 3, True)
    assert cut.truncated and not full.truncated
    assert cut.input_ids == full.input_ids[:-3] and cut.labels == full.labels[:-3]


def test_truncation_that_cuts_the_media_slot_is_refused(tok):
    slot = tokenize_conversation(SINGLE, tok, "vicuna_v1", 2048, True).input_ids.index(IMG)
    assert tokenize_conversation(SINGLE, tok, "vicuna_v1", slot + 1, True).truncated  # slot kept: fine
    with pytest.raises(SampleError, match="media slot") as err:
        tokenize_conversation(SINGLE, tok, "vicuna_v1", slot, True, sample_id="s1")
    assert err.value.reason == "media_past_max_length"  # skipped, unlike a truncated sample (too_long, kept)


def _gpt2_style_tokenizer():
    """A byte-level BPE with GPT-2's pre-tokenizer: it splits "\\n\\nRed" as "\\n","\\n","Red" but
    "\\n\\n" alone as one merged token, so llama3's header/answer boundary falls inside a token."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<s>", "</s>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["header\n\n", "and more\n\n"] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_unaligned_answer_spans_mask_whole_sample():
    tok = _gpt2_style_tokenizer()
    sample = tokenize_conversation(TEXT, tok, "llama3", 2048, False)
    assert sample.unaligned
    assert set(sample.labels) == {IGNORE_INDEX} and len(sample.labels) == len(sample.input_ids)
    # The inputs are still the tokenization of the whole prompt.
    assert sample.input_ids == tok(render(TEXT, "llama3", False), add_special_tokens=False)["input_ids"]
    # The same tokenizer aligns under vicuna_v1 (its boundaries are " answer" / "</s>").
    assert not tokenize_conversation(TEXT, tok, "vicuna_v1", 2048, False).unaligned


def test_dummy_prefix_tokenizer_aligns_through_prefix_check():
    """A SentencePiece-like tokenizer puts "▁" before the first word of every call (not after a
    special token), so segments tokenized alone differ from the whole text ("▁USER:" vs "USER:"
    after "</s>", the official LLaVA "tokenization mismatch"); the prefix check still aligns."""
    sp = Tokenizer(models.BPE(unk_token="<unk>"))
    sp.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    sp.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    sp.train_from_iterator([render(MULTI, "vicuna_v1", True)] * 5, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=sp, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    text = render(MULTI, "vicuna_v1", True)
    whole = tok(text.split("<image>")[1], add_special_tokens=False)["input_ids"]
    second_turn = tok("USER: Where is the triangle?", add_special_tokens=False)["input_ids"]
    assert not any(whole[k:k + len(second_turn)] == second_turn for k in range(len(whole)))  # segments differ

    sample = tokenize_conversation(MULTI, tok, "vicuna_v1", 2048, True)
    assert not sample.unaligned
    spans, run = [], []
    for t in sample.labels + [IGNORE_INDEX]:
        if t != IGNORE_INDEX:
            run.append(t)
        elif run:
            spans, run = spans + ["".join(tok.convert_ids_to_tokens(run))], []
    assert spans == ["\u2581Three.</s>", "\u2581At\u2581the\u2581top\u2581left.</s>"]


def test_our_tokenizer_aligns_awkward_text(tok):
    """Whitespace, digits and newlines around the answer boundaries still align with the trained tokenizer."""
    awkward = turns(("human", "  Count: 1234567\n\n"), ("gpt", "\n 42 items\n\n"), ("human", "and?\t"), ("gpt", "é🙂 done "))
    for template in ("vicuna_v1", "llama3"):
        sample = tokenize_conversation(awkward, tok, template, 2048, False)
        assert not sample.unaligned, template
        assert len(label_spans(tok, sample.labels)) == 2


def test_tokenizer_that_adds_bos_itself_gets_one_bos(tok):
    auto_bos = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tok.backend_tokenizer.to_str()),
                                       bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
    auto_bos.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
    assert auto_bos("hi")["input_ids"][0] == tok.bos_token_id  # it really adds one
    for template in ("vicuna_v1", "plain"):
        sample = tokenize_conversation(SINGLE if template != "plain" else CAPTION, auto_bos, template, 2048, True)
        assert sample.input_ids.count(tok.bos_token_id) == 1 and sample.input_ids[0] == tok.bos_token_id


# --------------------------------------------------------------------------- generation prompt
@pytest.mark.parametrize("template", ["vicuna_v1", "llama3", "plain"])
def test_build_prompt_is_training_prefix_before_first_answer(tok, template):
    record = CAPTION if template == "plain" else SINGLE
    sample = tokenize_conversation(record, tok, template, 2048, True)
    first_trained = next(k for k, t in enumerate(sample.labels) if t != IGNORE_INDEX)
    prompt = build_prompt(record, tok, template, True)
    assert prompt == sample.input_ids[:first_trained]
    # The question alone (no reference answer) gives the same prompt.
    assert build_prompt(record[:1], tok, template, True) == prompt


def test_build_prompt_multi_turn_keeps_history(tok):
    history = MULTI[:3]  # two questions, one answer so far
    prompt = build_prompt(history, tok, "vicuna_v1", True)
    assert decode_with_image(tok, prompt) == "<s>" + (
        f"{VICUNA_SYS} USER: <image>\nHow many circles? ASSISTANT: Three.</s>USER: Where is the triangle? ASSISTANT:")
    assert build_prompt(MULTI, tok, "vicuna_v1", True) == prompt


def test_template_corpus_has_no_placeholders():
    texts = list(template_corpus([(MULTI, True), (CAPTION, True)]))
    assert texts and not any("<image>" in t for t in texts)
    assert "a red square and a blue circle\n" in texts  # plain rendering of the caption
    assert sum("Where is the triangle?" in t for t in texts) == 2  # vicuna + llama3; plain skips multi-turn


# --------------------------------------------------------------------------- the release's inference prompt (F1)
def _llama3_tokenizer(tok, extra=()):
    """Our tokenizer made to behave like Llama-3's: <|begin_of_text|> is its BOS and its post-processor adds it
    (tokenizer.json of meta-llama/Llama-3.1-8B-Instruct), ``extra`` special tokens added."""
    backend = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    llama3 = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                     pad_token="<pad>")
    if extra:
        llama3.add_special_tokens({"additional_special_tokens": list(extra)})
    bos = llama3.convert_tokens_to_ids("<|begin_of_text|>")
    llama3.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)])
    return llama3


def official_tokenizer_image_token(prompt, tokenizer, image_token_index=IMAGE_TOKEN_INDEX):
    """``tokenizer_image_token`` of official LLaVA-Mini (ictnlp/LLaVA-Mini@47da113, llavamini/mm_utils.py:185),
    verbatim but for return_tensors: how every official inference script turns the prompt text into ids."""
    prompt_chunks = [tokenizer(chunk).input_ids for chunk in prompt.split('<image>')]

    def insert_separator(X, sep):
        return [ele for sublist in zip(X, [sep] * len(X)) for ele in sublist][:-1]

    input_ids = []
    offset = 0
    if len(prompt_chunks) > 0 and len(prompt_chunks[0]) > 0 and prompt_chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        input_ids.append(prompt_chunks[0][0])
    for x in insert_separator(prompt_chunks, [image_token_index] * (offset + 1)):
        input_ids.extend(x[offset:])
    return input_ids


@pytest.mark.parametrize("record, has_media", [(SINGLE[:1], True), (MULTI[:3], True), (TEXT[:1], False)])
def test_llava_llama_3_1_generation_prompt_is_official_inference_ids(tok, record, has_media):
    """The release's benchmarks were run on tokenizer_image_token(conv.get_prompt()): the Llama-3 tokenizer's own
    <|begin_of_text|> before the template's, two BOS. llava_llama_3_1 generation prompts have them; training ids
    (official preprocess_llama_3_1 strips the duplicate) and the llama3 template keep one."""
    llama3 = _llama3_tokenizer(tok)
    bos = llama3.bos_token_id
    text = render(record, "llava_llama_3_1", has_media, generation=True)
    assert text == render(record, "llama3", has_media, generation=True) and text.startswith("<|begin_of_text|>")
    official = official_tokenizer_image_token(text, llama3)
    assert official[:2] == [bos, bos] and official[2] != bos
    assert build_prompt(record, llama3, "llava_llama_3_1", has_media) == official
    assert build_prompt(record, llama3, "llama3", has_media) == official[1:]  # one BOS: our own models' prompt
    # a tokenizer that adds no BOS of its own: official gives one, so do we
    assert build_prompt(record, tok, "llava_llama_3_1", has_media) == official_tokenizer_image_token(text, tok)
    assert build_prompt(record, tok, "llava_llama_3_1", has_media).count(tok.convert_tokens_to_ids("<|begin_of_text|>")) == 1


def test_llava_llama_3_1_trains_as_llama3(tok):
    llama3 = _llama3_tokenizer(tok)
    for record, has_media in ((SINGLE, True), (MULTI, True), (TEXT, False)):
        ours = tokenize_conversation(record, llama3, "llava_llama_3_1", 2048, has_media)
        assert ours == tokenize_conversation(record, llama3, "llama3", 2048, has_media)
        assert ours.input_ids[:2] != [llama3.bos_token_id] * 2
