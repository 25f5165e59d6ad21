"""Names in the model's text are not cut short (hf_asynclm.name_completion)."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_asynclm.name_completion import (
    NameCompletionProcessor,
    NameIndex,
    NumberIndex,
    check_complete_names,
    quotable_text,
    check_quote_numbers,
)
from hf_asynclm.testing import tiny_llama, tiny_tokenizer

CONTEXT = (
    "<|user|>\nBook Nurun Traikre on a flight from San Francisco to Hong Kong, a hotel in Kuala Lumpur, "
    "time in Rio de Janeiro and weather in Auckland or Kathmandu. Gate F10, code PX409.\n<|assistant|>\n"
)


@pytest.mark.parametrize(
    "written, cut",
    [
        ("Kuala", True), ("Kuala ", True), ("Kuala Lu", True), ("Kuala Lumpur", False),
        ("Hong", True), ("Hong Kong", False), ("San", True), ("San Francisco", False),
        ("Rio", True), ("Rio de", True), ("Rio de Janeiro", False), ("Auck", True), ("Auckland", False),
        ("Book", False),  # a sentence's first word stands alone: "Booked" may be written
        ("Nurun", True), ("Nurun Traikre", False),  # the name within "Book Nurun Traikre"
        ("PX", True), ("PX409", False), ("F10", False),
        ("Paris", False), ("Lumpur", False),  # no name starts with these: nothing to hold
    ],
)
def test_a_name_start_is_cut_where_the_conversation_never_ends_a_name(written: str, cut: bool) -> None:
    assert NameIndex(CONTEXT).cut(written) is cut


@pytest.mark.parametrize(
    "written, piece, ok",
    [
        ("Kuala", ":", False), ("Kuala", " ", True), ("Kuala", " Lumpur", True), ("Kuala", " Lumpur: $99", True),
        ("Kuala", "a", True),  # the first word goes on: not spelt for the model
        ("Kuala ", "to", False), ("Kuala Lu", "nnur", False), ("Kuala Lu", "mpur", True), ("Kuala Lu", "mpur,", True),
        ("Hong", " to", False), ("Hong", " Kong.", True), ("Rio", " de", True), ("Rio de", " Janeiro", True),
        ("Rio de", ":", False), ("Auck", "-", False), ("Auck", "land", True), ("Kuala", "", False),  # EOS, markers
        ("Kuala", "[CALL]", False),
        # from SPELL_FROM letters of a name's first word on (no word of the conversation), its letters follow
        ("Auck", "ou", False), ("Auc", "ou", True), ("Kathm", "and", True), ("Lump", "ur", True), ("Nuru", "x", False),
        ("Book", "ed", True),  # a word of the conversation: goes on freely
    ],
)
def test_only_pieces_that_go_on_with_the_name_may_follow_a_cut(written: str, piece: str, ok: bool) -> None:
    assert NameIndex(CONTEXT).may_follow(written, piece) is ok


_WORD = st.from_regex(r"[A-Z][a-z]{2,8}", fullmatch=True)


@settings(max_examples=150, deadline=None)
@given(words=st.lists(_WORD, min_size=1, max_size=3), lead=st.sampled_from(["in ", "to ", "Hotel in ", "\"", "from "]),
       tail=st.sampled_from([".", ", then", "\"}", "?"]))
def test_writing_a_whole_name_of_the_context_is_never_refused(words: list[str], lead: str, tail: str) -> None:
    """Character by character, every name of the context can be written out and ended: at no
    point is the next character of the name refused, and the whole name is never a cut."""
    name = " ".join(words)
    index = NameIndex(f"Please look at this: {lead}{name}{tail}")
    for k in range(1, len(name)):
        written = name[:k]
        if index.cut(written):
            assert index.may_follow(written, name[k]), (written, name[k])
            assert index.may_follow(written, name[k:] + tail[0]), (written, name[k:])
    assert not index.cut(name)


def test_the_processor_refuses_a_token_that_ends_a_name_early_and_keeps_the_best_other() -> None:
    tok = tiny_tokenizer()
    proc = NameCompletionProcessor(tok)
    ids = tok.encode("Hotel in Kuala Lumpur? Kuala", add_special_tokens=False)
    colon, space = tok.convert_tokens_to_ids(":"), tok.encode(" ", add_special_tokens=False)[0]
    assert not proc.allowed(ids, colon) and proc.allowed(ids, space)
    assert not proc.allowed(ids, tok.eos_token_id) and not proc.allowed(ids, tok.convert_tokens_to_ids("[CALL]"))
    scores = torch.zeros(1, len(tok))
    scores[0, colon], scores[0, space] = 5.0, 4.0
    out = proc(torch.tensor([ids]), scores.clone())
    assert int(out[0].argmax()) == space and out[0, colon] == float("-inf")
    assert proc.steps_held == 1
    # the whole name, a name the context ends, and a word that is no name: nothing held
    for text in ("Hotel in Kuala Lumpur? Kuala Lumpur", "Hotel in Kuala Lumpur? Hotel", "Hotel in Kuala Lumpur? Rome"):
        ids = tok.encode(text, add_special_tokens=False)
        assert proc.allowed(ids, colon), text


def test_inside_a_call_block_the_processor_does_nothing() -> None:
    tok = tiny_tokenizer()
    proc = NameCompletionProcessor(tok)
    ids = tok.encode('Hotel in Kuala Lumpur? [CALL] h1 [HEAD] find_hotel(city="Kuala', add_special_tokens=False)
    assert proc.allowed(ids, tok.encode('"', add_special_tokens=False)[0])
    after = tok.encode('Hotel in Kuala Lumpur? [CALL] h1 [HEAD] find_hotel(city="Kuala Lumpur") [END] Kuala', add_special_tokens=False)
    assert not proc.allowed(after, tok.convert_tokens_to_ids(":"))


@pytest.mark.parametrize(
    "text, prompt_chars, expected",
    [
        # the prompt whole, then only the blocks: calls and results, not the model's own words
        ('Rome? [CALL] w1 [HEAD] f(city="Rome") [END] Donear [INTR] w1 [HEAD] 21 [END] Don', 6,
         'Rome? \n[CALL] w1 [HEAD] f(city="Rome") [END]\n[INTR] w1 [HEAD] 21 [END]'),
        ("Rome? Donear. Don", 6, "Rome? "),
        ("Rome? Donear", 0, ""),  # no prompt: only blocks count
        ("Rome?", 10, "Rome?"),  # the prompt is all there is
        # a prompt that ends inside a block: that block is read whole, and nothing after it
        ('Rome? [CALL] w1 [HEAD] f(city="Ro', 20, 'Rome? \n[CALL] w1 [HEAD] f(city="Ro'),
        ('Rome? [CALL] w1 [HEAD] f(city="Rome") [END] Mila', 20, 'Rome? \n[CALL] w1 [HEAD] f(city="Rome") [END]'),
        # a trap is no source; a block still open at the end is read as far as it goes
        ("Rome? [TRAP] [END] Zurich [INTR] w1 [HEAD] 2", 6, "Rome? \n[INTR] w1 [HEAD] 2"),
    ],
)
def test_quotable_text_is_the_prompt_calls_and_results(text: str, prompt_chars: int, expected: str) -> None:
    assert quotable_text(text, prompt_chars) == expected


_PIECES = ["Kuala Lumpur. ", "Donear ", '[CALL] h1 [HEAD] f(c="Rome") [END]', " [TRAP] [END]",
           "[INTR] h1 [HEAD] Hong Kong [END]", "Booked ", "Zurich "]


@given(st.lists(st.sampled_from(_PIECES), max_size=6), st.lists(st.sampled_from(_PIECES), max_size=6))
@settings(max_examples=150, deadline=None)
def test_the_prompt_and_every_block_after_it_are_quotable_and_nothing_else(prompt: list[str], generated: list[str]) -> None:
    head = "Weather in Auckland? " + "".join(prompt)
    text = head + "".join(generated)
    quotable = quotable_text(text, len(head))
    assert quotable.split("\n")[0] == head
    blocks = [p for p in generated if p.startswith(("[CALL]", "[INTR]"))]
    assert quotable.split("\n")[1:] == blocks
    for word in {w for p in generated if p not in blocks for w in re.findall(r"[A-Za-z]+", p)} - {"TRAP", "END"}:
        assert (word in quotable) == (word in head or any(word in b for b in blocks))


def test_a_name_the_model_made_up_itself_is_not_held() -> None:
    """The model's own text is no source of names: a cut word it wrote ("Donear") does not make
    it spell that word again ("Done." stays writable); names from the prompt and from results are held."""
    tok = tiny_tokenizer()
    prompt = tok.encode("Weather in Auckland? ", add_special_tokens=False)
    colon, dot = tok.convert_tokens_to_ids(":"), tok.convert_tokens_to_ids(".")
    e = tok.encode("e", add_special_tokens=False)
    proc = NameCompletionProcessor(tok)
    assert proc.allowed(prompt, colon)  # the first ids seen are the prompt
    done = prompt + tok.encode("Donear. Don", add_special_tokens=False) + e
    assert proc.allowed(done, dot)  # "Done." although the model wrote "Donear" before
    # the same words in a prompt are the conversation's: "Donear" is a name there, "Done" a cut of it
    assert not NameCompletionProcessor(tok).allowed(done, dot)
    # a name from a result after the prompt is held
    result = prompt + tok.encode('[INTR] h1 [HEAD] {"hotel": "Kuala Lumpur Inn"} [END] Kuala', add_special_tokens=False)
    assert not proc.allowed(result, colon)
    assert proc.allowed(result, tok.encode(" ", add_special_tokens=False)[0])
    # ids that do not start with the prompt seen begin a new sequence: they are its prompt
    other = tok.encode("Hotel in Kuala Lumpur? Kuala", add_special_tokens=False)
    assert not proc.allowed(other, colon)
    assert not NameCompletionProcessor(tok).allowed(other, colon)
    # a next turn's prompt that extends the last one: reset() makes it the prompt
    turn = prompt + tok.encode("Donear. User: Donear? Assistant: Done", add_special_tokens=False)
    proc.reset()
    assert proc.allowed(prompt, colon)
    assert proc.allowed(turn, dot)  # the reset processor took the first turn's ids for the prompt
    proc.reset()
    assert not proc.allowed(turn, dot)  # the whole turn is the prompt now: "Donear" is its name


def test_a_random_model_never_ends_a_name_of_its_prompt_early() -> None:
    """Sampled at a high temperature, a random model writes any token; with the processor no name
    of the prompt is ever left cut where the model's text goes on with something else."""
    from transformers import LogitsProcessorList

    tok = tiny_tokenizer()
    model = tiny_llama(tok, seed=1)
    prompt = "Weather in Kuala Lumpur and Hong Kong? Kuala"
    ids = tok(prompt, return_tensors="pt").input_ids
    n_prompt = ids.shape[1]
    for seed in range(6):
        proc = NameCompletionProcessor(tok)
        torch.manual_seed(seed)
        out = model.generate(ids, max_new_tokens=12, do_sample=True, temperature=3.0, top_k=0,
                             logits_processor=LogitsProcessorList([proc]), pad_token_id=tok.pad_token_id)
        text = tok.decode(out[0, n_prompt:].tolist())
        written = "Kuala" + text
        # the first word may go on in letters; otherwise the name is written out before anything else
        assert text[:1].isalnum() or written.startswith("Kuala Lumpur") or "Kuala Lumpur".startswith(written), text


RESULTS = '{"symbol": "FWT", "price": 579.5} {"events": 1, "free": "15:05", "date": "2027-04-06"} {"km": 4541} {"seat": "39A"} '


@pytest.mark.parametrize(
    "tail, piece, ok",
    [
        ("FWT: $", "579", True), ("FWT: $", "57", True), ("FWT: $", "6", False),  # each digit goes on with a number
        ("FWT: $579", ".", True), ("FWT: $579.", "5", True), ("FWT: $579.", "0", False),  # 579.0 for 579.5
        ("FWT: $579.", "5.", True), ("FWT: $579.5", "", True), ("FWT: $579.5", "3", False),
        ("FWT: $57", ".", False), ("FWT: $57", " ", False), ("FWT: $57", "", False),  # 57 is no number of the text
        ("Distance: ", "4541 km.", True), ("Distance: ", "4540 km.", False),
        ("2027-", "04-06: ", True), ("2027-04-06: ", "1 events", True), ("Free at ", "15:05.", True),
        ("Free at ", "15:07.", False), ("at 15", ":", True),
        ("Gate F", "11", True), ("Seat ", "19B", True), ("PX", "999", True),  # codes: glued to letters, not numbers
        ("Seat ", "3", True), ("Seat 3", "9A.", True), ("Seat 39", ".", False),  # a code's digits go on with it
        ("Done", ".", True), ("Weather: ", "sunny", True),
    ],
)
def test_numbers_in_the_text_are_the_conversations(tail: str, piece: str, ok: bool) -> None:
    assert NumberIndex(RESULTS).may_write(tail, piece) is ok


@settings(max_examples=150, deadline=None)
@given(number=st.from_regex(r"[1-9][0-9]{0,5}(\.[0-9]{1,2})?", fullmatch=True),
       lead=st.sampled_from(["$", "Price: ", "= ", "at "]), end=st.sampled_from([".", " USD", ", then", ""]))
def test_writing_a_number_of_the_context_is_never_refused(number: str, lead: str, end: str) -> None:
    """Character by character, every number of the context can be written out and ended."""
    index = NumberIndex(f'{{"price": {number}}} ')
    for k in range(len(number)):
        assert index.may_write(lead + number[:k], number[k]), (number, k)
    assert index.may_write(lead + number, end)


def test_the_processor_holds_numbers_to_the_conversation_and_can_leave_them_alone() -> None:
    tok = tiny_tokenizer()
    ids = tok.encode('{"price": 579.5} FWT: $579.', add_special_tokens=False)
    zero, five = tok.convert_tokens_to_ids("0"), tok.convert_tokens_to_ids("5")
    proc = NameCompletionProcessor(tok, names=False, numbers=True)
    assert not proc.allowed(ids, zero) and proc.allowed(ids, five)
    scores = torch.zeros(1, len(tok))
    scores[0, zero], scores[0, five] = 5.0, 4.0
    out = proc(torch.tensor([ids]), scores.clone())
    assert int(out[0].argmax()) == five and proc.steps_held == 1
    assert NameCompletionProcessor(tok).allowed(ids, zero)  # names only (the default)
    inside = tok.encode('{"price": 579.5} [CALL] x1 [HEAD] convert(amount=579.', add_special_tokens=False)
    assert proc.allowed(inside, zero)  # inside a call block: the call constraint's business


def test_bad_settings_are_refused() -> None:
    with pytest.raises(TypeError, match="complete_names must be True or False"):
        check_complete_names("yes")
    with pytest.raises(ValueError, match="candidates"):
        NameCompletionProcessor(tiny_tokenizer(), candidates=0)
    with pytest.raises(TypeError, match="quote_numbers must be True or False"):
        check_quote_numbers(1)
    with pytest.raises(ValueError, match="nothing to hold"):
        NameCompletionProcessor(tiny_tokenizer(), names=False)


def test_asynclm_takes_the_setting_from_the_caller_or_the_checkpoint(tmp_path) -> None:
    import json
    import shutil

    from hf_asynclm import AsyncLM
    from hf_asynclm.asynclm import DEFAULT_CHECKPOINT, checkpoint_runtime_defaults

    tok = tiny_tokenizer()
    model = tiny_llama(tok)
    with pytest.raises(TypeError, match="complete_names"):
        AsyncLM(model, tok, complete_names="yes")  # type: ignore[arg-type]
    assert AsyncLM(model, tok).complete_names is False
    assert AsyncLM(model, tok, complete_names=True).complete_names is True
    folder = tmp_path / "ckpt"
    shutil.copytree(DEFAULT_CHECKPOINT, folder)
    record = json.loads((folder / "cml_training.json").read_text())
    record["runtime"]["complete_names"] = True
    (folder / "cml_training.json").write_text(json.dumps(record))
    assert checkpoint_runtime_defaults(folder)["complete_names"] is True
    assert AsyncLM.from_pretrained(folder).complete_names is True
    assert AsyncLM.from_pretrained(folder, complete_names=False).complete_names is False


def test_a_generation_with_the_setting_on_never_cuts_a_name_of_the_prompt() -> None:
    """Through AsyncLM's own decode loop (with the call constraint in front): a random model
    sampled hot writes no name of the prompt cut short and then something else."""
    import re

    from hf_asynclm import AsyncLM
    from hf_asynclm.name_completion import NameIndex

    tok = tiny_tokenizer()
    model = tiny_llama(tok, seed=2)
    alm = AsyncLM(model, tok, complete_names=True, constrain_calls="schema", system_prompt=False)
    prompt = "Weather in Kuala Lumpur and Hong Kong?"
    index = NameIndex(prompt)
    for seed in range(4):
        torch.manual_seed(seed)
        result = alm.generate(prompt, max_new_tokens=24, do_sample=True, temperature=3.0, top_k=0)
        text = result.text
        for m in re.finditer(r"(?<![A-Za-z0-9])(Kuala|Hong)(?![A-Za-z0-9])", text):
            rest = text[m.end():]
            if rest:  # the name went on, or the text ended there (the token limit)
                assert rest.startswith(" Lumpur" if m.group(1) == "Kuala" else " Kong") or \
                    (" Lumpur" if m.group(1) == "Kuala" else " Kong").startswith(rest), text
        assert index.names  # the prompt has names to hold


def test_a_generation_with_quote_numbers_writes_only_the_conversations_numbers(tmp_path) -> None:
    """Through AsyncLM's decode loop: a random model sampled hot (pushed to write digits) writes
    numbers the prompt lacks without the setting and none with it (a number cut by the token limit
    may stop early); the setting comes from the caller or the checkpoint's record like the others."""
    import json
    import re
    import shutil

    from transformers import LogitsProcessorList

    from hf_asynclm import AsyncLM
    from hf_asynclm.asynclm import DEFAULT_CHECKPOINT

    tok = tiny_tokenizer()
    model = tiny_llama(tok, seed=3)
    with pytest.raises(TypeError, match="quote_numbers"):
        AsyncLM(model, tok, quote_numbers="yes")  # type: ignore[arg-type]
    prompt = "FWT is at 579.5, ADM at 42 and the hotel costs 1200 for 3 nights."
    numbers = set(re.findall(r"[0-9]+(?:\.[0-9]+)?", prompt))
    digits = [tok.convert_tokens_to_ids(d) for d in "0123456789."]

    def more_digits(input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores[:, digits] += 4.0  # after the runtime's processors: a refused digit stays refused
        return scores

    def foreign_numbers(quote_numbers: bool) -> list[str]:
        alm = AsyncLM(model, tok, quote_numbers=quote_numbers, system_prompt=False)
        out = []
        for seed in range(3):
            torch.manual_seed(seed)
            text = alm.generate(prompt, max_new_tokens=32, do_sample=True, temperature=3.0, top_k=0,
                                logits_processor=LogitsProcessorList([more_digits])).text
            for m in re.finditer(r"(?<![A-Za-z0-9.])[0-9]+(?:\.[0-9]+)?(?![A-Za-z0-9])", text):
                at_end = m.end() >= len(text.rstrip(".")) - 1
                if not (m.group(0) in numbers or (at_end and any(n.startswith(m.group(0)) for n in numbers))):
                    out.append(m.group(0))
        return out

    assert foreign_numbers(False)  # the control: the raw model does write numbers of its own
    assert foreign_numbers(True) == []
    folder = tmp_path / "ckpt"
    shutil.copytree(DEFAULT_CHECKPOINT, folder)
    record = json.loads((folder / "cml_training.json").read_text())
    record["runtime"]["quote_numbers"] = True
    (folder / "cml_training.json").write_text(json.dumps(record))
    assert AsyncLM.from_pretrained(folder).quote_numbers is True
    assert AsyncLM.from_pretrained(folder, quote_numbers=False).quote_numbers is False
