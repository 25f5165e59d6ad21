"""Constrained decoding of CML call blocks (hf_asynclm.call_grammar)."""

from __future__ import annotations

import json
import keyword
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_asynclm.call_grammar import MAX_PENDING_BYTES, CallChecker, CallGrammarProcessor, Grounding, Status, check_constrain_calls
from hf_asynclm.testing import tiny_llama, tiny_tokenizer

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}, "units": {"type": "string", "enum": ["C", "F"]}},
            "required": ["city"],
        },
    },
}
BOOK = {
    "name": "book",
    "parameters": {
        "type": "object",
        "properties": {
            "hotel": {"type": "string"},
            "price": {"type": "number"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "extra": {"type": "object"},
            "confirm": {"type": "boolean"},
            "note": {"type": ["string", "null"]},
        },
        "required": ["hotel"],
    },
}
RAW = {"name": "raw", "parameters": {"type": "dict", "properties": {"x": {"type": "float"}, "y": {"type": "any"}}, "required": ["x"]}}
DOTTED = {"name": "math.factorial", "parameters": {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}}


def status(body: str, **kwargs) -> str:
    return CallChecker([WEATHER, BOOK, DOTTED], **kwargs).check(body).name


@pytest.mark.parametrize(
    "body",
    [
        'get_weather(city="Paris")',
        ' get_weather(city="Paris", days=3) ',
        "get_weather(city='Paris', units=\"F\",)",
        'book(hotel="A \\"B\\"", price=-12.5e3, tags=["x", "y"], extra={"a": [1, {"b": None}]}, confirm=True, note=None)',
        "book(hotel=w1)",  # a reference to an earlier call
        "math.factorial(n=5)",
        "book(hotel='x', price=0.5, tags=[], extra={})",
        'raw(x=1.0, y="a")',  # Python type names and unknown types (BFCL's "float", "any") are read as JSON ones / any
    ],
)
def test_whole_valid_calls_are_complete_and_every_prefix_is_a_prefix(body: str) -> None:
    checker = CallChecker([WEATHER, BOOK, DOTTED, RAW], call_ids=["w1"])
    assert checker.check(body) is Status.COMPLETE
    for end in range(len(body.rstrip())):
        assert checker.check(body[:end]) is Status.PREFIX, body[:end]


@pytest.mark.parametrize(
    "body, why",
    [
        ("get_time(", "unknown tool"),
        ("get_weather (", "space before the parenthesis"),
        ("get_weather(town=", "unknown argument"),
        ('get_weather(city="a", city=', "argument twice"),
        ("get_weather(days=3)", "required argument missing"),
        ('get_weather(days="3"', "string for an integer"),
        ("get_weather(days=3.5", "float for an integer"),
        ('get_weather(city="Paris", units="K"', "not in the enum"),
        ('get_weather(city=3', "number for a string"),
        ("book(hotel=x9", "a reference to no earlier call"),
        ('book(hotel="a", confirm=Yes', "not a literal"),
        ('book(hotel="a", price=None', "None for a number that is not nullable"),
        ('get_weather(city="Paris") x', "text after the call"),
        ('get_weather(city="Paris"   ', "too many spaces"),
        ('get_weather(city="Par\nis")', "a newline in a string"),
        ("get_weather(city=print(1))", "a call as a value"),
        ('get_weather(city="a", days=011', "leading zero"),
        ('get_weather(city="a", days=' + "5" * 40, "a number that does not end"),
        ('book(hotel="a", price=any', "a word that is neither a literal nor an earlier call"),
        ('get_weather("Paris")', "positional argument"),
    ],
)
def test_invalid_calls_are_rejected_at_the_first_bad_character(body: str, why: str) -> None:
    assert status(body, call_ids=["w1"]) == "INVALID", why


names = st.text("abcdefghij_", min_size=1, max_size=8).filter(lambda s: s[0] != "_" and not keyword.iskeyword(s))
literals = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=False, allow_infinity=False),
              st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\n\r"), max_size=12)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text("xyz", min_size=1, max_size=3), inner, max_size=3)),
    max_leaves=6,
)


@settings(max_examples=200, deadline=None)
@given(name=names, args=st.dictionaries(names, literals, min_size=0, max_size=4))
def test_any_call_of_a_schemaless_tool_parses_prefix_by_prefix(name: str, args: dict) -> None:
    """Property: the checker never rejects the start of a call the executor would accept."""
    from hf_asynclm.executor import parse_call

    body = f"{name}(" + ", ".join(f"{k}={v!r}" for k, v in args.items()) + ")"
    assert parse_call(body).kwargs == args or any(isinstance(v, float) for v in args.values())
    checker = CallChecker([{"name": name, "parameters": {}}])
    assert checker.check(body) is Status.COMPLETE, body
    for end in range(len(body)):
        assert checker.check(body[:end]) is Status.PREFIX, body[:end]


def test_every_call_of_the_held_out_synthetic_tasks_passes_the_schema_check() -> None:
    from hf_asynclm.data.synthetic import generate_tasks

    n = 0
    for task in generate_tasks(300, seed=1, split="eval"):
        checker = CallChecker(task.tools, call_ids=[c.call_id for c in task.calls])
        for call in task.calls:
            assert checker.check(call.body()) is Status.COMPLETE, call.body()
            n += 1
    assert n > 500


def test_bad_settings_and_tokenizers_are_refused() -> None:
    with pytest.raises(ValueError, match="constrain_calls"):
        check_constrain_calls("strict")
    with pytest.raises(ValueError, match="single tokens"):
        CallGrammarProcessor(tiny_tokenizer(with_markers=False), [WEATHER])
    with pytest.raises(ValueError, match="without a name"):
        CallGrammarProcessor(tiny_tokenizer(), [{"parameters": {}}])
    with pytest.raises(ValueError, match="candidates"):
        CallGrammarProcessor(tiny_tokenizer(), [WEATHER], candidates=0)


def _sample_blocks(tok, model, prompt: str, processors: list, seed: int, n: int = 80) -> str:
    torch.manual_seed(seed)
    ids = torch.tensor([tok.encode(prompt, add_special_tokens=False)])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=True, temperature=1.5,
                         logits_processor=processors, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=False)


def test_a_random_model_writes_only_valid_calls_under_the_constraint() -> None:
    """A random model (which writes garbage) sampled inside an open block: with the processor
    everything it writes up to [END] is a valid call of the tools; without it, not."""
    tok = tiny_tokenizer()
    model = tiny_llama(tok, seed=3)
    prompt = "Weather in Paris? [CALL] w1 [HEAD]"
    checker = CallChecker([WEATHER, BOOK])
    valid_with = valid_without = 0
    for seed in range(6):
        proc = CallGrammarProcessor(tok, [WEATHER, BOOK])
        text = _sample_blocks(tok, model, prompt, [proc], seed)
        body = text.split("[END]")[0]
        assert "[INTR]" not in body and "[CALL]" not in body and tok.eos_token not in body
        expected = Status.COMPLETE if "[END]" in text else Status.PREFIX
        assert checker.check(body) in (expected, Status.COMPLETE), text
        valid_with += 1
        bare = _sample_blocks(tok, model, prompt, [], seed).split("[END]")[0]
        valid_without += checker.check(bare) is not Status.INVALID
    assert valid_with == 6 and valid_without < 6


def test_greedy_decoding_takes_the_best_valid_token() -> None:
    tok = tiny_tokenizer()
    proc = CallGrammarProcessor(tok, [WEATHER])
    ids = tok.encode("[CALL] w1 [HEAD] get_weather(city=", add_special_tokens=False)
    scores = torch.zeros(1, len(tok))
    quote = tok.convert_tokens_to_ids('"')
    bad = tok.encode("3", add_special_tokens=False)[0]
    scores[0, bad] = 10.0  # the model prefers a number for a string argument
    scores[0, quote] = 5.0
    out = proc(torch.tensor([ids]), scores)
    assert int(out.argmax()) == quote
    assert torch.isinf(out[0, bad])


def test_ids_of_earlier_calls_cannot_be_reused_and_head_end_stay_inside_blocks() -> None:
    tok = tiny_tokenizer()
    proc = CallGrammarProcessor(tok, [WEATHER])
    head, end = tok.convert_tokens_to_ids("[HEAD]"), tok.convert_tokens_to_ids("[END]")
    earlier = '[CALL] w1 [HEAD] get_weather(city="Rome") [END] [INTR] w1 [HEAD] {"t": 3} [END] '
    assert not proc.allowed(tok.encode(earlier + "[CALL] w1", add_special_tokens=False), head)
    assert proc.allowed(tok.encode(earlier + "[CALL] w2", add_special_tokens=False), head)
    assert not proc.allowed(tok.encode(earlier + "[CALL] user", add_special_tokens=False), head)  # reserved for the runtime
    assert proc.allowed(tok.encode(earlier + "[CALL] w1", add_special_tokens=False), tok.encode("2", add_special_tokens=False)[0])
    outside = tok.encode(earlier + "Rome is", add_special_tokens=False)
    assert not proc.allowed(outside, head) and not proc.allowed(outside, end)
    trap = tok.encode(earlier + "[TRAP]", add_special_tokens=False)
    assert proc.allowed(trap, end) and not proc.allowed(trap, tok.encode("x", add_special_tokens=False)[0])
    body = tok.encode(earlier + '[CALL] w2 [HEAD] get_weather(city="Rome")', add_special_tokens=False)
    assert proc.allowed(body, end) and not proc.allowed(body[:-1], end)
    assert not proc.allowed(body, tok.eos_token_id)


def test_no_valid_token_leaves_the_scores_alone() -> None:
    tok = tiny_tokenizer()
    proc = CallGrammarProcessor(tok, [WEATHER], candidates=1, max_scan=1)
    ids = tok.encode("[CALL] w1 [HEAD] get_weather(city=", add_special_tokens=False)
    scores = torch.full((1, len(tok)), float("-inf"))
    scores[0, tok.encode("3", add_special_tokens=False)[0]] = 0.0  # the only finite token is invalid
    assert torch.equal(proc(torch.tensor([ids]), scores), scores)
    assert proc.dead_ends == 1


def test_a_valid_token_far_down_the_ranking_is_found_in_the_whole_vocabulary() -> None:
    """None of the max_scan most likely tokens is valid (Gemma after ``[HEAD] co``): the processor
    looks through the whole vocabulary and keeps the best valid tokens instead of giving up."""
    tok = tiny_tokenizer()
    proc = CallGrammarProcessor(tok, [WEATHER], candidates=2, max_scan=4)
    ids = tok.encode("[CALL] w1 [HEAD] get_weather(", add_special_tokens=False)
    scores = torch.linspace(1.0, 0.0, len(tok)).unsqueeze(0)  # token 0 best, the last worst
    ranked = torch.argsort(scores[0], descending=True).tolist()
    best = [t for t in ranked if proc.allowed(ids, t)][0]
    assert ranked.index(best) >= 4  # beyond max_scan
    out = proc(torch.tensor([ids]), scores)
    kept = torch.nonzero(out[0] > float("-inf")).flatten().tolist()
    assert best in kept and all(proc.allowed(ids, t) for t in kept)
    assert int(out[0].argmax()) == best  # greedy decoding takes the best valid token
    assert all(tok.decode(ids + [t]).endswith(tuple("city"[: i + 1] for i in range(4))) for t in kept)
    assert proc.vocabulary_searches == 1 and proc.dead_ends == 0
    # the same in a trap: only [END] or spaces, found however low they rank
    trap = tok.encode("Rome [TRAP]", add_special_tokens=False)
    out = proc(torch.tensor([trap]), scores)
    kept = torch.nonzero(out[0] > float("-inf")).flatten().tolist()
    assert kept and all(t == tok.convert_tokens_to_ids("[END]") or not tok.decode([t]).strip() for t in kept)
    assert proc.vocabulary_searches == 2 and proc.dead_ends == 0
    # the index is built once per tokenizer (a processor is made per generation), and again when it grows
    index = proc._first_char_index()
    assert CallGrammarProcessor(tok, [WEATHER])._first_char_index() is index
    tok.add_tokens(["zzq"])
    assert CallGrammarProcessor(tok, [WEATHER])._first_char_index() is not index


def test_the_schema_of_a_registry_works_as_it_is() -> None:
    from hf_asynclm.executor.registry import ToolRegistry

    def get_weather(city: str, days: int = 1) -> dict:
        """Weather.

        Args:
            city: The city.
            days: How many days.
        """
        return {"city": city}

    schemas = ToolRegistry.coerce([get_weather]).schemas()
    checker = CallChecker(schemas)
    assert checker.check('get_weather(city="Oslo", days=2)') is Status.COMPLETE
    assert checker.check("get_weather(days=2)") is Status.INVALID
    assert json.dumps(schemas)  # plain data


class _OpenACall:
    """Logits processor: the first generated token is [CALL] (a random model would never write one)."""

    def __init__(self, tok, prompt_len: int) -> None:
        self.call = tok.convert_tokens_to_ids("[CALL]")
        self.prompt_len = prompt_len

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] == self.prompt_len:
            scores = scores.clone()
            scores[0, self.call] += 1e4
        return scores


@pytest.mark.parametrize("constrain", ["schema", "grounded", "off"])
def test_asynclm_holds_the_calls_of_a_random_model_to_the_schemas(constrain: str) -> None:
    from transformers import LogitsProcessorList

    from hf_asynclm import AsyncLM

    def get_weather(city: str, days: int = 1) -> dict:
        """Weather.

        Args:
            city: The city.
            days: How many days.
        """
        return {"city": city, "temp_c": 18}

    tok = tiny_tokenizer()
    alm = AsyncLM(tiny_llama(tok, seed=5), tok, tools=[get_weather], constrain_calls=constrain)
    prompt_len = alm.encode_prompt("Weather in Paris?")["input_ids"].shape[1]
    result = alm.generate("Weather in Paris?", max_new_tokens=60, do_sample=False,
                          logits_processor=LogitsProcessorList([_OpenACall(tok, prompt_len)]))
    assert result.raw_text.startswith("[CALL]")
    block = result.raw_text.split("[END]")[0][len("[CALL]"):]
    call_id, _, body = block.partition("[HEAD]")
    checker = CallChecker(alm.registry.schemas())
    if "[HEAD]" in block:
        ok = re.fullmatch(r"\s*[A-Za-z_]\w*\s*", call_id) is not None and checker.check(body) is not Status.INVALID
    elif "(" in call_id:  # fire and forget: the call follows [CALL]
        ok = checker.check(call_id) is not Status.INVALID
    else:  # still on the id
        ok = re.fullmatch(r"\s*\w*\s*", call_id) is not None
    assert ok == (constrain != "off"), result.raw_text


def test_asynclm_refuses_bad_constraint_settings() -> None:
    from hf_asynclm import AsyncLM

    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match="constrain_calls"):
        AsyncLM(tiny_llama(tok), tok, constrain_calls="strict")  # type: ignore[arg-type]
    plain = tiny_tokenizer(with_markers=False)
    with pytest.raises(ValueError, match="add_cml_tokens"):
        AsyncLM(tiny_llama(plain), plain, constrain_calls="schema")
    assert AsyncLM(tiny_llama(plain), plain).constrain_calls == "off"


def test_the_step_by_step_state_matches_a_full_scan() -> None:
    """The processor scans only new tokens while a sequence grows; any other sequence is scanned whole."""
    tok = tiny_tokenizer()
    proc = CallGrammarProcessor(tok, [WEATHER])
    text = ('Hi. [CALL] w1 [HEAD] get_weather(city="Rome") [END] ok [INTR] w1 [HEAD] {"t": 3} [END] '
            "[TRAP] [END] [CALL] w2 [HEAD] get_weather(city=\"Oslo\") [END] bye")
    ids = tok.encode(text, add_special_tokens=False)
    for n in range(1, len(ids) + 1):
        assert proc._state_during_generation(ids[:n]) == proc._state(ids[:n]), tok.decode(ids[:n])
    # not an extension of the last step: a shorter sequence, or one whose last tokens differ
    for other in (ids[:5], ids[:12] + tok.encode(" [CALL] w3", add_special_tokens=False)):
        assert proc._state_during_generation(other) == proc._state(other)
    proc._state_during_generation(ids[:20])
    changed = ids[:19] + tok.encode("[CALL]", add_special_tokens=False) + ids[20:30]
    assert proc._state_during_generation(changed) == proc._state(changed)


# -- constrain_calls="grounded": values copied from the context ---------------------------------
CONTEXT = 'Book 3 nights at the Hotel Roma in Rome, Italy for 120.5 USD (was 500000.0); coords -122.4194, ends 2027-08-07 at $180.'


@pytest.mark.parametrize(
    ("value", "whole", "prefix"),
    [
        ("Rome", True, True),
        ("Rome, Italy", True, True),
        ("Hotel Roma", True, True),
        ("Rom", False, True),  # a word cut short
        ("ome", False, False),  # a word entered in the middle
        ("Paris", False, False),
        ("", True, True),
        (", Italy", True, True),  # no word character at the cut: allowed
        ("2027-08-07", True, True),
        ("Hotel ", False, True),  # whitespace at either end: never a whole value
        (" Roma", False, False),
        ("Hotel", False, True),  # a name cut short: "Hotel Roma" goes on with a capitalised word
        ("USD", True, True),  # all capitals: not a name going on (and nothing capitalised follows)
    ],
)
def test_grounded_strings_are_whole_words_of_the_context(value: str, whole: bool, prefix: bool) -> None:
    g = Grounding(CONTEXT)
    assert g.string(value) is whole
    assert g.string_prefix(value) is prefix


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet="ab Z1.,-é\n", max_size=24), data=st.data())
def test_grounded_strings_can_always_be_finished_and_whole_values_start_as_prefixes(text: str, data) -> None:
    """Property: every prefix the grounding allows has a whole value that extends it (no dead
    end), and every prefix of a whole value is allowed."""
    g = Grounding(text)
    subs = {text[i:j] for i in range(len(text)) for j in range(i + 1, len(text) + 1)}
    whole = {v for v in subs if g.string(v)}
    for v in subs:
        if g.string_prefix(v):
            assert any(w.startswith(v) for w in whole), (text, v)
    if whole:
        v = data.draw(st.sampled_from(sorted(whole)))
        assert all(g.string_prefix(v[:k]) for k in range(len(v) + 1)), (text, v)


@pytest.mark.parametrize(
    ("literal", "number", "integer", "prefix"),
    [
        ("120.5", True, False, True),
        ("120", False, False, True),  # the start of 120.5, not a number of the text
        ("3", True, True, True),
        ("500000.0", True, False, True),
        ("500000", True, True, True),  # a whole number written 500000.0
        ("-122.4194", True, False, True),
        ("122.4194", False, False, False),  # the sign belongs to the number
        ("180", True, True, True),  # a number that ends a sentence
        ("2027", True, True, True),
        ("12", False, False, True),
        ("7", False, False, False),  # inside 2027-08-07: glued to a digit or word
        ("999", False, False, False),
    ],
)
def test_grounded_numbers_are_numbers_of_the_context_as_written(literal: str, number: bool, integer: bool, prefix: bool) -> None:
    g = Grounding(CONTEXT)
    assert g.number(literal) is number
    assert g.number(literal, integer=True) is integer
    assert g.number_prefix(literal) is prefix


def test_the_grounded_checker_refuses_miscopied_values_and_exempts_literals_enums_and_references() -> None:
    context = 'Weather in Rome for 3 days, in C. Then book Bankruptcy Inn at 99.5. [CALL] w1 [HEAD]'
    ok = ['get_weather(city="Rome")', 'get_weather(city="Rome", days=3, units="F")', 'book(hotel="Bankruptcy Inn", price=99.5)',
          'book(hotel=w1, confirm=True, note=None)', 'book(hotel="Rome", tags=["Rome", "Bankruptcy Inn"], extra={"Rome": 3})']
    bad = ['get_weather(city="Rom")', 'get_weather(city="Paris")', 'get_weather(city="Rome", days=4)',
           'book(hotel="Bankrupt")', 'book(hotel="Bankruptcy Inn", price=99)', 'book(hotel="Rome", tags=["Romx"])',
           'book(hotel="Rome", extra={"Lima": 3})', 'get_weather(city="Rome", days=99)']
    for body in ok:
        assert status(body, call_ids=["w1"], grounding=context) == "COMPLETE", body
        for end in range(1, len(body)):
            assert status(body[:end], call_ids=["w1"], grounding=context) == "PREFIX", body[:end]
    for body in bad:
        assert status(body, call_ids=["w1"], grounding=context) == "INVALID", body
        assert status(body, call_ids=["w1"]) == "COMPLETE", body  # the schema alone allows them


def _literals(value):
    if isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from _literals(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _literals(v)
    elif not isinstance(value, bool) and value is not None:
        yield value


def test_every_value_of_the_bfcl_plan_is_grounded_in_its_prompt() -> None:
    """With the plan in the prompt (the paper's cheat sheet) every ground-truth value is there,
    as the plan writes it (BFCL's own types aside: some ground truths break their schemas)."""
    from hf_asynclm.data import bfcl

    try:
        tasks = [t for cat in ("simple_python", "multiple", "parallel", "parallel_multiple") for t in bfcl.load_tasks(cat)[:40]]
    except FileNotFoundError:
        pytest.skip("bfcl-eval data not installed")
    n = 0
    for task in tasks:
        task = bfcl.with_cheat_sheet(task, {c.call_id: 100 for c in task.calls})
        grounding = Grounding("\n".join(str(m.get("content")) for m in task.messages))
        for call in task.calls:
            for value in _literals(call.arguments):
                ok = grounding.string(value) if isinstance(value, str) else grounding.number(repr(value))
                assert ok, (call.body(), value)
                n += 1
    assert n > 300


def test_a_random_model_copies_values_only_from_the_context_under_the_grounded_constraint() -> None:
    """Sampled at a high temperature inside an open block, a random model may pick any value:
    grounded, every string and number it finishes is one the prompt (or the schemas) holds."""
    tok = tiny_tokenizer()
    model = tiny_llama(tok, seed=3)
    prompt = "Weather in Paris or Oslo for 2 or 14 days? [CALL] w1 [HEAD]"
    grounding = Grounding(prompt)
    finished = 0
    for seed in range(8):
        proc = CallGrammarProcessor(tok, [WEATHER], grounded=True)
        text = _sample_blocks(tok, model, prompt, [proc], seed, n=60)
        body = text.split("[END]")[0]
        assert CallChecker([WEATHER], grounding=prompt).check(body) is not Status.INVALID, text
        for value in re.findall(r'city=\s*"([^"]*)"', body):
            assert grounding.string(value), text
            finished += 1
        for value in re.findall(r"days=\s*(-?[\d.]+)", body):
            assert grounding.number(value, integer=True), text
            finished += 1
        assert not any(ch in body for ch in "\ufffd")
    assert finished >= 4


def test_a_token_that_never_completes_a_character_is_refused() -> None:
    """Inside a free string a token may end inside a character (its other bytes follow); a run
    longer than any character is refused (schema and grounded); grounded, only where the context
    goes on with a character beyond ASCII after the string so far."""
    tok = tiny_tokenizer()
    byte = next(t for t in range(len(tok)) if tok.decode([t]) == "\ufffd")  # a lone byte of a longer character
    for grounded in (False, True):
        proc = CallGrammarProcessor(tok, [WEATHER], grounded=grounded)
        ids = tok.encode('Wetter in Zürich? [CALL] w1 [HEAD] get_weather(city="Z', add_special_tokens=False)
        for _ in range(MAX_PENDING_BYTES):
            assert proc.allowed(ids, byte)
            ids.append(byte)
        assert not proc.allowed(ids, byte)
        plain = tok.encode('Weather in Zurich? [CALL] w1 [HEAD] get_weather(city="Z', add_special_tokens=False)
        assert proc.allowed(plain, byte) is not grounded
    assert CallChecker([WEATHER], grounding="Wetter in Zürich?").in_string('get_weather(city="Z')
    assert not CallChecker([WEATHER], grounding="Weather in Zurich?").in_string('get_weather(city="Z')


def test_grounded_parameters_with_no_value_in_the_context_are_not_offered() -> None:
    """Grounded, a number parameter can only be chosen where the context holds a number of its
    type (or an earlier call to refer to); a tool whose required one cannot be is not offered."""
    no_numbers = "Weather in Paris?"
    assert status('get_weather(city="Paris", d', grounding=no_numbers) == "INVALID"
    assert status('get_weather(city="Paris", days=', grounding=no_numbers) == "INVALID"
    assert status('get_weather(city="Paris", u', grounding=no_numbers) == "PREFIX"  # an enum needs no copy
    assert status('get_weather(city="Paris", d', grounding="Weather in Paris for 3 days?") == "PREFIX"
    assert status('get_weather(city="Paris", d', grounding="Weather in Paris for 2.5 days?") == "INVALID"  # integer
    assert status("math.f", grounding=no_numbers) == "INVALID"
    assert status("math.f", grounding="5!") == "PREFIX"
    assert status("math.f", grounding=no_numbers, call_ids=["n1"]) == "PREFIX"  # math.factorial(n=n1)
    assert status("math.f") == "PREFIX"


def test_grounded_string_parameters_whose_rule_no_piece_of_the_context_keeps_are_not_offered() -> None:
    """Grounded, a string parameter with a pattern (a date) can only be chosen where some piece of
    the context keeps it; a tool whose required one cannot be is not offered, so that a model asked
    for something its tools cannot do is not led into a call it can only write broken."""
    calendar = {"name": "get_calendar", "description": "Events on a day.", "parameters": {"type": "object", "properties": {
        "date": {"type": "string", "pattern": r"^\d{4}-\d{2}-\d{2}$"},
        "note": {"type": "string", "pattern": r"^[a-z]+$"}}, "required": ["date"]}}
    tools = [calendar, WEATHER]
    no_date = "Prices of XZRA and RNVF?"
    assert CallChecker(tools, grounding=no_date).check("get_c").name == "INVALID"
    assert CallChecker(tools, grounding=no_date).check("get_w").name == "PREFIX"  # its city is any word
    assert CallChecker(tools, grounding=no_date, call_ids=["k1"]).check("get_c").name == "PREFIX"  # date=k1
    assert CallChecker(tools).check("get_c").name == "PREFIX"  # not grounded: the schema alone
    dated = CallChecker(tools, grounding="Events ON 2027-01-02?")
    assert dated.check("get_c").name == "PREFIX"
    assert dated.check('get_calendar(date="2027-01-02")').name == "COMPLETE"
    assert dated.check('get_calendar(date="2027-01-02", n').name == "INVALID"  # no lower-case word in the context
    assert CallChecker(tools, grounding="Events ON 2027-01-02? Note: gym").check(
        'get_calendar(date="2027-01-02", n').name == "PREFIX"
    # an enum or a free-text parameter needs no copy
    free = {**calendar, "parameters": {**calendar["parameters"], "properties": {
        "date": {"type": "string", "pattern": r"^\d{4}-\d{2}-\d{2}$", "x-free-text": True}}}}
    assert CallChecker([free, WEATHER], grounding=no_date).check("get_c").name == "PREFIX"
    listed = {**calendar, "parameters": {**calendar["parameters"], "properties": {
        "date": {"type": "string", "pattern": r"^\d{4}-\d{2}-\d{2}$", "enum": ["2027-01-02"]}}}}
    assert CallChecker([listed, WEATHER], grounding=no_date).check("get_c").name == "PREFIX"


def test_call_ids_in_the_prompt_are_not_calls_of_the_generation() -> None:
    """A prompt's example (``[CALL] w1 [HEAD] ...``) or an earlier turn names no call the executor
    knows: its ids may be used again and are no references; the generation's own ids are."""
    tok = tiny_tokenizer()
    head = tok.convert_tokens_to_ids("[HEAD]")
    prompt = tok.encode('Example: [CALL] w1 [HEAD] get_weather(city="Rome") [END] Now: [CALL]', add_special_tokens=False)
    proc = CallGrammarProcessor(tok, [WEATHER, BOOK])
    proc(torch.tensor([prompt]), torch.zeros(1, len(tok)))  # the first step: the prompt
    assert proc.allowed(prompt + tok.encode(" w1 ", add_special_tokens=False), head)
    body = prompt + tok.encode(' w2 [HEAD] book(hotel=w', add_special_tokens=False)
    assert not proc.allowed(body, tok.encode("1", add_special_tokens=False)[0])  # not a reference
    generated = prompt + tok.encode(' w2 [HEAD] get_weather(city="Oslo") [END] [CALL] w3 [HEAD] book(hotel=w', add_special_tokens=False)
    assert proc.allowed(generated, tok.encode("2", add_special_tokens=False)[0])
    again = prompt + tok.encode(' w2 [HEAD] get_weather(city="Oslo") [END] [CALL] w2 ', add_special_tokens=False)
    assert not proc.allowed(again, head)


def test_one_processor_reused_for_another_prompt_grounds_in_that_prompt() -> None:
    tok = tiny_tokenizer()
    proc = CallGrammarProcessor(tok, [WEATHER], grounded=True)
    quote = tok.encode('"', add_special_tokens=False)[0]
    for city, other in (("Paris", "Oslo"), ("Oslo", "Paris")):
        prompt = tok.encode(f"A long shared system prompt. Weather in {city}? [CALL] w1 [HEAD]", add_special_tokens=False)
        proc(torch.tensor([prompt]), torch.zeros(1, len(tok)))  # a new sequence: its first step
        assert proc.allowed(prompt + tok.encode(f' get_weather(city="{city}', add_special_tokens=False), quote)
        assert not proc.allowed(prompt + tok.encode(f' get_weather(city="{other}', add_special_tokens=False), quote)


def test_a_backslash_at_the_end_is_checked_against_what_it_may_stand_for() -> None:
    """A string may end in a backslash whose character comes with the next token: an enum (or,
    grounded, the context) must have a value that goes on with an escaped character; escapes
    read as Python reads them (an unknown one keeps its backslash)."""
    assert status('get_weather(city="Paris", units="\\') == "INVALID"  # no unit goes on with an escape
    assert status('get_weather(city="Par\\') == "PREFIX"  # a free string may
    assert status('get_weather(city="Rome\\', grounding="Weather in Rome?") == "INVALID"
    assert status('get_weather(city="it\\', grounding="Weather in it\'s town?") == "PREFIX"
    assert status('get_weather(city="it\\\'s town")', grounding="Weather in it\'s town?") == "COMPLETE"
    assert status('get_weather(city="\\d+")', grounding="match \\d+ please") == "COMPLETE"  # the value is \\d+
    assert status('get_weather(city="d+")', grounding="match \\d+ please") == "COMPLETE"


# -- no_repeat_calls -----------------------------------------------------------------------------
CALENDAR = {"name": "get_calendar", "parameters": {"type": "object", "properties": {"date": {"type": "string"}}, "required": ["date"]}}
HOTEL = {
    "name": "book_hotel",
    "parameters": {
        "type": "object",
        "properties": {"hotel_id": {"type": "string"}, "nights": {"type": "integer"}},
        "required": ["hotel_id", "nights"],
    },
}
DATES = "Check my calendar on 2028-02-10, 2028-10-10 and 2029-09-16."


def repeat_status(body: str, earlier: list, **kwargs) -> str:
    return CallChecker([CALENDAR, HOTEL, WEATHER, BOOK], earlier_calls=earlier, **kwargs).check(body).name


def test_a_call_made_before_cannot_be_made_again_whatever_the_order_or_spelling_of_its_arguments() -> None:
    earlier = [("book_hotel", {"hotel_id": "UM445", "nights": 8})]
    assert repeat_status('book_hotel(hotel_id="UM445", nights=8)', []) == "COMPLETE"
    assert repeat_status('book_hotel(hotel_id="UM445", nights=8)', earlier) == "INVALID"
    assert repeat_status("book_hotel(nights=8, hotel_id='UM445')", earlier) == "INVALID"
    assert repeat_status('book_hotel(hotel_id="UM445", nights=9)', earlier) == "COMPLETE"
    assert repeat_status('book_hotel(hotel_id="UM446", nights=8)', earlier) == "COMPLETE"
    assert repeat_status('get_weather(city="Oslo", days=2)', [("get_weather", {"city": "Oslo"})]) == "COMPLETE"  # another call
    # the same values as other literals: 8.0 is 8; True is not 1
    assert repeat_status("book(hotel='A', price=8.0)", [("book", {"hotel": "A", "price": 8})]) == "INVALID"
    assert repeat_status("book(hotel='A', confirm=True)", [("book", {"hotel": "A", "confirm": 1})]) == "COMPLETE"
    assert repeat_status("book(hotel='A', tags=['x', 'y'])", [("book", {"hotel": "A", "tags": ("x", "y")})]) == "INVALID"
    assert repeat_status("book(hotel='A', extra={'k': [1]})", [("book", {"hotel": "A", "extra": {"k": [1.0]}})]) == "INVALID"
    assert repeat_status("book(hotel='A', extra={'k': [2]})", [("book", {"hotel": "A", "extra": {"k": [1.0]}})]) == "COMPLETE"


def test_the_value_that_would_repeat_a_call_is_refused_as_soon_as_it_is_the_only_way_on() -> None:
    """On the last argument the repeating value is refused while it is written, not only at
    ``)``: grounded, every occurrence of it in the context is passed over, so the model turns
    to another date rather than to a piece or an extension of this one."""
    earlier = [("get_calendar", {"date": "2028-02-10"})]
    text = DATES + " [CALL] c1 [HEAD] get_calendar(date='2028-02-10') [END]"
    assert repeat_status("get_calendar(date='2028-0", earlier, grounding=text) == "INVALID"  # only 2028-02-10 goes on so
    assert repeat_status("get_calendar(date='2028-1", earlier, grounding=text) == "PREFIX"
    assert repeat_status("get_calendar(date='2028')", earlier, grounding=text) == "COMPLETE"  # the year of 2028-10-10
    assert repeat_status("get_calendar(date='2028-10-10')", earlier, grounding=text) == "COMPLETE"
    assert repeat_status("get_calendar(date='2028-02-10')", [], grounding=text) == "COMPLETE"
    # not grounded: refused when the value is finished (the model may not close the string on it)
    assert repeat_status("get_calendar(date='2028-02-10'", earlier) == "INVALID"
    assert repeat_status("get_calendar(date='2028-02-1", earlier) == "PREFIX"
    # numbers, enums and keywords likewise
    hotel = [("book_hotel", {"hotel_id": "UM445", "nights": 8})]
    ground = "Book UM445 for 8 or 18 nights."
    assert repeat_status("book_hotel(hotel_id='UM445', nights=8", hotel, grounding=ground) == "INVALID"
    assert repeat_status("book_hotel(hotel_id='UM445', nights=1", hotel, grounding=ground) == "PREFIX"
    assert repeat_status("book_hotel(nights=8, hotel_id='U", hotel, grounding=ground) == "INVALID"
    assert repeat_status("book_hotel(nights=18, hotel_id='UM445')", hotel, grounding=ground) == "COMPLETE"
    weather = [("get_weather", {"city": "Oslo", "days": 2, "units": "C"})]
    assert repeat_status('get_weather(city="Oslo", days=2, units="C', weather) == "INVALID"
    assert repeat_status('get_weather(city="Oslo", days=2, units="F")', weather) == "COMPLETE"
    booked = [("book", {"hotel": "A", "confirm": True, "price": 3, "tags": [], "extra": {}, "note": None})]
    assert repeat_status("book(hotel='A', price=3, tags=[], extra={}, note=None, confirm=T", booked) == "INVALID"
    assert repeat_status("book(hotel='A', price=3, tags=[], extra={}, note=None, confirm=F", booked) == "PREFIX"


def test_a_call_that_may_still_take_an_optional_argument_is_refused_only_at_its_end() -> None:
    """Where more arguments may follow, the value is no repeat yet (``get_weather(city="Oslo",
    days=3)`` is another call): only ``)`` after the same arguments is refused."""
    earlier = [("get_weather", {"city": "Oslo"})]
    ground = "Weather in Oslo or Rome for 3 days?"
    assert repeat_status('get_weather(city="Oslo"', earlier, grounding=ground) == "PREFIX"
    assert repeat_status('get_weather(city="Oslo")', earlier, grounding=ground) == "INVALID"
    assert repeat_status('get_weather(city="Oslo", days=3)', earlier, grounding=ground) == "COMPLETE"


@settings(max_examples=150, deadline=None)
@given(
    made=st.lists(st.sampled_from(["2028-02-10", "2028-10-10", "2029-09-16", "2028"]), max_size=4, unique=True),
    body=st.sampled_from(["2028-02-10", "2028-10-10", "2029-09-16", "2028", "2028-02", "10"]),
)
def test_no_prefix_of_a_call_is_refused_while_a_new_call_can_still_come_of_it(made: list, body: str) -> None:
    """Whatever has been made: a repeat is refused; a new call that is accepted is accepted
    prefix by prefix; a date no call has used is refused only where a used value starts it (the
    price of passing over the places where a used value is written: ``2028`` used shuts out
    ``2028-10-10``)."""
    text = DATES + "".join(f" [CALL] c{i} [HEAD] get_calendar(date='{d}') [END]" for i, d in enumerate(made))
    checker = CallChecker([CALENDAR], grounding=text, earlier_calls=[("get_calendar", {"date": d}) for d in made])
    call = f"get_calendar(date='{body}')"
    result = checker.check(call)
    if body in made:
        assert result is Status.INVALID
    elif result is Status.COMPLETE:
        assert all(checker.check(call[:i]) is Status.PREFIX for i in range(1, len(call)))
    unmade = [d for d in ("2028-02-10", "2028-10-10", "2029-09-16") if d not in made]
    for d in unmade:
        shut_out = any(d.startswith(m) for m in made)
        assert (checker.check(f"get_calendar(date='{d}')") is Status.COMPLETE) is not shut_out


def _ids(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def test_the_processor_steers_away_from_a_call_this_generation_already_made() -> None:
    tok = tiny_tokenizer()
    prompt = _ids(tok, DATES + " ")
    made = _ids(tok, "[CALL] c1 [HEAD] get_calendar(date='2028-02-10') [END] [CALL] c2 [HEAD] get_calendar(date='2028-")
    proc = CallGrammarProcessor(tok, [CALENDAR], grounded=True, no_repeat=True)
    proc(torch.tensor([prompt]), torch.zeros(1, len(tok)))  # the first step sees the prompt
    zero, one = _ids(tok, "0")[0], _ids(tok, "1")[0]
    assert not proc.allowed(prompt + made, zero) and proc.allowed(prompt + made, one)
    scores = torch.zeros(1, len(tok))
    scores[0, zero] = 5.0  # the model would write 2028-02-10 again
    scores[0, one] = 1.0
    assert int(proc(torch.tensor([prompt + made]), scores).argmax()) == one
    # without the setting, or with the earlier call in the prompt (an example, not this generation's call)
    assert CallGrammarProcessor(tok, [CALENDAR], grounded=True).allowed(prompt + made, zero)
    fresh = CallGrammarProcessor(tok, [CALENDAR], grounded=True, no_repeat=True)
    fresh(torch.tensor([prompt + made[:-12]]), torch.zeros(1, len(tok)))
    assert fresh.allowed(prompt + made, zero)


def test_where_only_a_repeat_can_go_on_it_is_let_through_rather_than_broken() -> None:
    """A model cornered into a repeat (both booleans used; a reference to an earlier call is
    no stand-in for a boolean) still writes a valid block: the repeat is allowed and counted,
    no dead end."""
    tok = tiny_tokenizer()
    toggle = {"name": "toggle", "parameters": {"type": "object", "properties": {"on": {"type": "boolean"}}, "required": ["on"]}}
    prompt = _ids(tok, "Switch it. ")
    made = _ids(tok, "[CALL] t1 [HEAD] toggle(on=True) [END] [CALL] t2 [HEAD] toggle(on=False) [END] [CALL] t3 [HEAD] toggle(on=")
    proc = CallGrammarProcessor(tok, [toggle], no_repeat=True)
    proc(torch.tensor([prompt]), torch.zeros(1, len(tok)))
    true = _ids(tok, "T")[0]
    assert not proc.allowed(prompt + made, true)  # by the rule alone
    scores = torch.zeros(1, len(tok))
    scores[0, true] = 5.0
    out = proc(torch.tensor([prompt + made]), scores)
    assert int(out.argmax()) == true and proc.repeats_allowed == 1 and proc.dead_ends == 0
    # where True or False is still free, a reference is not offered for it; elsewhere it is
    used = [("book", {"hotel": "A", "confirm": True, "price": 3, "tags": [], "extra": {}, "note": None})]
    head = "book(hotel='A', price=3, tags=[], extra={}, note=None, confirm="
    assert repeat_status(head + "t", used, call_ids=["t1"]) == "INVALID"
    assert repeat_status(head + "F", used, call_ids=["t1"]) == "PREFIX"
    assert repeat_status(head + "t", [], call_ids=["t1"]) == "PREFIX"
    assert repeat_status("book(hotel=t", [("book", {"hotel": "A"})], call_ids=["t1"]) == "PREFIX"


def test_asynclm_no_repeat_calls_settings() -> None:
    from hf_asynclm import AsyncLM

    tok = tiny_tokenizer()
    model = tiny_llama(tok)
    with pytest.raises(ValueError, match="constrain_calls"):
        AsyncLM(model, tok, no_repeat_calls=True)
    with pytest.raises(TypeError, match="True or False"):
        AsyncLM(model, tok, constrain_calls="schema", no_repeat_calls="yes")  # type: ignore[arg-type]
    assert AsyncLM(model, tok, constrain_calls="grounded", no_repeat_calls=True).no_repeat_calls is True


@pytest.mark.parametrize(
    ("text", "value", "whole"),
    [
        ("fly from Osaka to San Francisco on Monday", "San", False),
        ("fly from Osaka to San Francisco on Monday", "San Francisco", True),
        ("fly from Osaka to San Francisco on Monday", "Osaka", True),  # followed by a lower-case word
        ("the match of Liverpool F.C. last week", "Liverpool", False),
        ("the match of Liverpool F.C. last week", "Liverpool F.C.", True),
        ("weather in New York City and in New York.", "New York", True),  # one occurrence ends there
        ("weather in New York City", "New York", False),  # the price: only the whole name
        ("convert 120 USD EUR", "USD", True),  # all capitals: codes, not names
        ("fly to Rio de Janeiro", "Rio", False),  # a lower-case name particle in between
        ("fly to Rio de Janeiro", "Rio de Janeiro", True),
        ("fly to Rio de Janeiro", "Rio de", False),  # cut after the particle
        ("trains to Frankfurt am Main", "Frankfurt am", False),
        ("ask Anna de facto", "Anna de", True),  # no capitalised word after the particle
        ("a flat in Casa de Campo and Rio de Janeiro", "Casa de Campo", True),
        ("trains to Frankfurt am Main", "Frankfurt", False),
        ("ask Anna de facto", "Anna", True),  # a particle, but no capitalised word after it
        ("text Hodra 'Meet at 16:05'", "Hodra", True),
    ],
)
def test_grounded_strings_are_not_cut_inside_a_name(text: str, value: str, whole: bool) -> None:
    g = Grounding(text)
    assert g.string(value) is whole
    assert g.string_prefix(value)  # a cut name can still be written on to its end


def test_grounded_calls_finish_the_name_they_copy() -> None:
    """A call may not close a copied string inside a name: after ``city="San`` the quote is refused
    and `` Francisco`` offered, so the call the executor gets names the city the user asked for."""
    ctx = "Weather in San Francisco today?"
    assert status('get_weather(city="San"', grounding=ctx) == "INVALID"
    assert status('get_weather(city="San F', grounding=ctx) == "PREFIX"
    assert status('get_weather(city="San Francisco")', grounding=ctx) == "COMPLETE"


def test_grounded_values_are_never_copied_from_the_cml_markers() -> None:
    """``[CALL]`` in the context is the protocol's syntax: ``city="CALL"`` is no copy of it (a
    small model that lost its place in a list wrote ``flight_status(code="CALL")``); the same word
    in the conversation's text still is."""
    tok = tiny_tokenizer()
    proc = CallGrammarProcessor(tok, [WEATHER], grounded=True)
    quote = tok.encode('"', add_special_tokens=False)[0]
    prompt = tok.encode('Weather in Oslo? [CALL] w1 [HEAD] get_weather(city="Oslo") [END] [CALL] w2 [HEAD]', add_special_tokens=False)
    proc(torch.tensor([prompt]), torch.zeros(1, len(tok)))
    for word in ("CALL", "HEAD", "END"):
        assert not proc.allowed(prompt + tok.encode(f' get_weather(city="{word}', add_special_tokens=False), quote), word
    assert proc.allowed(prompt + tok.encode(' get_weather(city="Oslo', add_special_tokens=False), quote)
    said = tok.encode('Weather in END, the town? [CALL] w1 [HEAD]', add_special_tokens=False)
    proc(torch.tensor([said]), torch.zeros(1, len(tok)))
    assert proc.allowed(said + tok.encode(' get_weather(city="END', add_special_tokens=False), quote)


SEND = {
    "name": "send_message",
    "parameters": {
        "type": "object",
        "properties": {"to": {"type": "string"}, "text": {"type": "string", "x-free-text": True}},
        "required": ["to", "text"],
    },
}


def test_a_free_text_parameter_is_held_to_the_schema_alone_under_grounding() -> None:
    """A message body the model composes from a result ("Booked, seat 21D" from ``seat: 21D``)
    cannot be copied whole from the context: a parameter marked ``"x-free-text"`` takes it under
    ``"grounded"``, while the other parameters of the same call still must copy their values."""
    context = "Book Ann on a flight and text Ann the seat. [CALL] b1 [HEAD] book() [END] [INTR] b1 [HEAD] seat: 21D [END]"
    checker = CallChecker([SEND], grounding=context)
    body = 'send_message(to="Ann", text="Booked, seat 21D")'
    assert checker.check(body) is Status.COMPLETE
    for end in range(1, len(body)):
        assert checker.check(body[:end]) is Status.PREFIX, body[:end]
    assert checker.check('send_message(to="Annie", text="hi")') is Status.INVALID  # "to" is still grounded
    assert checker.check('send_message(to="Ann", text="Bookéd')  is Status.PREFIX
    assert checker.in_string('send_message(to="Ann", text="Book')  # any character may follow, ASCII or not
    assert not checker.in_string('send_message(to="An')  # "Ann" goes on in ASCII
    unmarked = json.loads(json.dumps(SEND).replace(', "x-free-text": true', ""))
    assert CallChecker([unmarked], grounding=context).check(body) is Status.INVALID  # without the mark: grounded
    assert CallChecker([SEND], grounding=context, earlier_calls=[("send_message", {"to": "Ann", "text": "hi"})]).check(
        'send_message(to="Ann", text="hi")'
    ) is Status.INVALID  # no_repeat_calls still holds
    assert CallChecker([SEND]).check('send_message(to="Ann", text=3)') is Status.INVALID  # the schema too


def test_the_processor_lets_a_model_compose_a_free_text_value_under_grounding() -> None:
    """Token by token: grounded, the first character of a composed message body is allowed in the
    free-text parameter and refused in a grounded one."""
    tok = tiny_tokenizer()
    prompt = 'Text Ann the seat. [CALL] m1 [HEAD] send_message(to="Ann", text="'
    ids = tok.encode(prompt, add_special_tokens=False)
    z = next(t for t in range(len(tok)) if tok.decode([t]) == "Z")  # no word of the context starts with Z
    assert CallGrammarProcessor(tok, [SEND], grounded=True).allowed(ids, z)
    unmarked = json.loads(json.dumps(SEND).replace(', "x-free-text": true', ""))
    assert not CallGrammarProcessor(tok, [unmarked], grounded=True).allowed(ids, z)


def test_a_free_text_value_ends_at_its_length_limit() -> None:
    """A free-text value is held to :data:`MAX_FREE_TEXT_CHARS`: at the limit only its end may follow,
    so a model refused the end of a message it already sent (``no_repeat_calls``) cannot write on
    inside the string until the token limit."""
    from hf_asynclm.call_grammar import MAX_FREE_TEXT_CHARS

    checker = CallChecker([SEND], grounding="Text Ann.")
    full = 'send_message(to="Ann", text="' + "x" * MAX_FREE_TEXT_CHARS
    assert checker.check(full) is Status.PREFIX
    assert checker.check(full + '")') is Status.COMPLETE
    assert checker.check(full + "x") is Status.INVALID
    assert checker.check(full + "\\n") is Status.INVALID  # an escape is a character too
    assert checker.check(full + "\\") is Status.INVALID
    assert checker.in_string(full[:-1]) and not checker.in_string(full)  # no byte of a longer character at the limit
    again = [("send_message", {"to": "Ann", "text": "Booked"})]
    repeat = CallChecker([SEND], grounding="Text Ann.", earlier_calls=again)
    assert repeat.check('send_message(to="Ann", text="Booked")') is Status.INVALID
    assert repeat.check('send_message(to="Ann", text="Booked' + "x" * (MAX_FREE_TEXT_CHARS - 6) + '")') is Status.COMPLETE
    assert repeat.check('send_message(to="Ann", text="Booked' + "x" * (MAX_FREE_TEXT_CHARS - 5)) is Status.INVALID


# --- value rules: pattern, lengths, bounds ---------------------------------------------------
RULED = {
    "name": "find_flight",
    "description": "Find a flight.",
    "parameters": {
        "type": "object",
        "properties": {
            "destination": {"type": "string", "pattern": r"^[A-Z][a-z]+(?: [A-Z][a-z]+)*$"},
            "date": {"type": "string", "pattern": r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
            "seats": {"type": "integer", "minimum": 1, "maximum": 9},
            "note": {"type": "string", "maxLength": 5},
        },
        "required": ["destination"],
    },
}


@pytest.mark.parametrize(
    "body, expected",
    [
        ('find_flight(destination="Paris")', "COMPLETE"),
        ('find_flight(destination="paris")', "INVALID"),  # the pattern, in schema mode too
        ('find_flight(destination="Paris", date="2027-04-0', "PREFIX"),
        ('find_flight(destination="Paris", date="250ms")', "INVALID"),
        ('find_flight(destination="Paris", seats=9)', "COMPLETE"),
        ('find_flight(destination="Paris", seats=10', "INVALID"),  # digits only take it further
        ('find_flight(destination="Paris", seats=0)', "INVALID"),
        ('find_flight(destination="Paris", note="short")', "COMPLETE"),
        ('find_flight(destination="Paris", note="longer', "INVALID"),
    ],
)
def test_schema_value_rules_hold_the_values(body: str, expected: str) -> None:
    assert CallChecker([RULED]).check(body).name == expected


def test_grounded_and_ruled_a_value_is_not_begun_that_only_one_rule_lets_end() -> None:
    """"San Francisco flight on 2026-02-27" is in the request and starts like the destination, but
    no copy of it past "San Francisco" keeps the pattern: the space after it is refused, so the
    model must close the value there."""
    context = "What does a Bedrutrel to San Francisco flight on 2026-02-27 cost in EUR?"
    checker = CallChecker([RULED], grounding=context)
    assert checker.check('find_flight(destination="San Francisco"').name == "PREFIX"
    assert checker.check('find_flight(destination="San Francisco ').name == "INVALID"
    assert checker.check('find_flight(destination="San Francisco flight').name == "INVALID"
    assert checker.check('find_flight(destination="San Francisco", date="2026-02-27")').name == "COMPLETE"
    assert checker.check('find_flight(destination="San Francisco", seats=2026').name == "INVALID"  # bounds
    # without the rule the run-on copy is a grounded value
    plain = {**RULED, "parameters": {"type": "object", "properties": {"destination": {"type": "string"}}}}
    assert CallChecker([plain], grounding=context).check('find_flight(destination="San Francisco flight on 2026-02-27")').name == "COMPLETE"


def test_a_bad_value_rule_fails_when_the_checker_is_built() -> None:
    bad = {"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "string", "pattern": "(["}}}}
    with pytest.raises(ValueError, match="tool 'f'.*not a valid regular expression"):
        CallChecker([bad])
    with pytest.raises(ValueError, match="must be a number"):
        CallChecker([{"name": "g", "parameters": {"type": "object", "properties": {"n": {"type": "integer", "maximum": "9"}}}}])


def test_grounded_values_from_documentation_come_from_the_called_tools_own() -> None:
    """A word only another tool documents ("Number" of "Number of nights") is no value of this one."""
    hotel = {"name": "book_hotel", "description": "Book a room.", "parameters": {"type": "object", "properties": {
        "nights": {"type": "integer", "description": "Number of nights, default 2"}}}}
    clock = {"name": "get_time", "description": "Local time in a city.", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}}}}
    context = "Time in Oslo and a room for 3 nights?"
    own = CallChecker([hotel, clock], grounding=context, own_docs=True)
    assert own.check('get_time(city="Oslo")').name == "COMPLETE"
    assert own.check('get_time(city="Local")').name == "COMPLETE"  # its own description
    assert own.check('get_time(city="Number")').name == "INVALID"
    assert own.check("book_hotel(nights=2)").name == "COMPLETE"  # its own default
    shared = CallChecker([hotel, clock], grounding=context + "\n" + "Number of nights, default 2")
    assert shared.check('get_time(city="Number")').name == "COMPLETE"  # one text for all tools: as before
    with pytest.raises(ValueError, match="own_docs"):
        CallChecker([hotel], grounding=None, own_docs=True)


def test_a_number_with_a_leading_zero_grounds_nothing() -> None:
    # "07" of a date cannot be written in a call (Python reads no 07): it offers no number to start
    g = Grounding("Meet on 2027-08-07 for 05 minutes.")
    assert g.number("2027", integer=True) and not g.number_prefix("0", integer=True)


def test_the_cli_demo_tools_carry_their_value_rules() -> None:
    from hf_asynclm.demo_tools import VALUE_RULES
    from hf_asynclm_cli.common import load_tools

    schemas = {s["function"]["name"]: s["function"] for s in load_tools(None).schemas()}
    assert set(VALUE_RULES) <= set(schemas)
    for tool, rules in VALUE_RULES.items():
        for param, rule in rules.items():
            assert rule.items() <= schemas[tool]["parameters"]["properties"][param].items(), (tool, param)
    checker = CallChecker(list(schemas.values()))
    assert checker.check('add_event(title="Gym", date="2027-01-02", time="7pm")').name == "INVALID"
    assert checker.check('add_event(title="Gym", date="2027-01-02", time="19:00")').name == "COMPLETE"
