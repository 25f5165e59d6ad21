"""CML: formatting, the incremental parser (property tests), tokenizer support, the monitor."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_asynclm.cml import (
    END,
    MARKERS,
    Block,
    CMLParser,
    TextEvent,
    add_cml_tokens,
    format_call,
    format_error,
    format_interrupt,
    format_trap,
    marker_token_ids,
    parse_blocks,
    serialize_result,
    visible_text,
)
from hf_asynclm.monitor import CMLMonitor
from hf_asynclm.testing import tiny_llama, tiny_tokenizer


def parse_in_pieces(text: str, cuts: list[int]) -> list:
    parser = CMLParser()
    events = []
    prev = 0
    for cut in sorted(set(c for c in cuts if 0 < c < len(text))):
        events += parser.feed(text[prev:cut])
        prev = cut
    events += parser.feed(text[prev:])
    events += parser.flush()
    return events


def normalise(events):
    """Merge consecutive text events (cutting may split a text run)."""
    out = []
    for e in events:
        if isinstance(e, TextEvent) and out and isinstance(out[-1], TextEvent):
            out[-1] = TextEvent(out[-1].text + e.text)
        else:
            out.append(e)
    return out


ident = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,6}", fullmatch=True)
safe_text = st.text(alphabet=st.characters(blacklist_characters="[]", blacklist_categories=("Cs",)), max_size=20)
any_text = st.lists(st.sampled_from(list("[]CALINTRHEDP ab\n{}\"'()=,") + list(MARKERS)), max_size=40).map("".join)


@settings(max_examples=300, deadline=None)
@given(text=any_text, cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=12))
def test_cutting_text_anywhere_gives_the_same_events(text, cuts):
    whole = normalise(parse_in_pieces(text, []))
    pieces = normalise(parse_in_pieces(text, cuts))
    assert whole == pieces


@settings(max_examples=200, deadline=None)
@given(
    items=st.lists(
        st.one_of(
            st.tuples(st.just("call"), ident, safe_text.filter(lambda s: s.strip() == s and s)),
            st.tuples(st.just("anon"), st.just(None), safe_text.filter(lambda s: s.strip() == s and s)),
            st.tuples(st.just("intr"), ident, safe_text.filter(lambda s: s.strip() == s and s)),
            st.tuples(st.just("trap"), st.just(None), st.just("")),
            st.tuples(st.just("text"), st.just(None), safe_text),
        ),
        max_size=8,
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=10),
)
def test_formatted_blocks_parse_back(items, cuts):
    text = ""
    expected = []
    for kind, cid, body in items:
        if kind == "call":
            text += format_call(body, call_id=cid)
            expected.append(("call", cid, body))
        elif kind == "anon":
            text += format_call(body)
            expected.append(("call", None, body))
        elif kind == "intr":
            text += format_interrupt(cid, body)
            expected.append(("interrupt", cid, body))
        elif kind == "trap":
            text += format_trap()
            expected.append(("trap", None, ""))
        else:
            text += body
    blocks = [e for e in parse_in_pieces(text, cuts) if isinstance(e, Block)]
    assert [(b.kind, b.call_id, b.body) for b in blocks] == expected


def test_markers_glued_to_neighbours():
    text = 'a[CALL] x [HEAD] f(a=1) [END][CALL] y [HEAD] g() [END]\n[TRAP][END]]['
    blocks = parse_blocks(text)
    assert [(b.kind, b.call_id) for b in blocks] == [("call", "x"), ("call", "y"), ("trap", None)]
    assert visible_text(text) == "a\n]["


@pytest.mark.parametrize(
    "text, error",
    [
        ("[END]", "with no open block"),
        ("[CALL] a [HEAD] f() [CALL] b [HEAD] g() [END]", "inside an open"),
        ("[CALL] 1a [HEAD] f() [END]", "invalid id"),
        ("[CALL] [HEAD] f() [END]", "empty id"),
        ("[CALL] a [HEAD] f() [HEAD] g() [END]", "more than one"),
        ("[TRAP] x [END]", "takes no body"),
        ("[INTR] hello [END]", "needs an id"),
        ("[CALL] a [HEAD] f(", "unterminated"),
    ],
)
def test_malformed_blocks_are_reported_not_raised(text, error):
    blocks = parse_blocks(text)
    assert any(b.kind == "malformed" and error in (b.error or "") for b in blocks), blocks


def test_parser_state_tracks_the_critical_section():
    p = CMLParser()
    p.feed("hello [CA")
    assert not p.in_block and not p.at_safe_point  # a partial marker is held back
    p.feed("LL] w1 [HEAD] f(")
    assert p.in_block and p.open_kind == "call"
    p.feed(") [END]")
    assert p.at_safe_point


def test_serialize_result_json_repr_truncation_and_defusing():
    assert serialize_result({"a": 1}) == '{"a": 1}'
    assert serialize_result("plain") == "plain"
    assert serialize_result({1, 2}) in ("[1, 2]", "[2, 1]")

    class Odd:
        __slots__ = ()

        def __repr__(self):
            return "<odd>"

    assert serialize_result(Odd()) == "<odd>"
    out = serialize_result("y" * 1000, max_chars=10)
    assert out == "y" * 10 + "...[truncated 990 chars]"
    assert END not in serialize_result("a [END] b")
    assert format_error("ValueError", "bad\nthing") == "error: ValueError: bad thing"


def test_add_cml_tokens_adds_single_tokens_and_mean_initialises():
    tok = tiny_tokenizer(with_markers=False)
    model = tiny_llama(tok)
    old = model.get_input_embeddings().weight.detach().clone()
    assert add_cml_tokens(tok, model) == 5
    ids = marker_token_ids(tok)
    assert ids.single_token
    emb = model.get_input_embeddings().weight
    for tid in ids.by_id:
        torch.testing.assert_close(emb[tid], old.mean(0))
    out = model.get_output_embeddings().weight
    assert out.shape[0] == len(tok)
    assert add_cml_tokens(tok, model) == 0  # idempotent
    assert tok.decode(tok.encode("[CALL] a [HEAD] f() [END]", add_special_tokens=False)) == "[CALL] a [HEAD] f() [END]"


@pytest.mark.parametrize("with_markers", [True, False])
def test_monitor_on_token_ids_matches_parsing_the_text(with_markers):
    tok = tiny_tokenizer(with_markers=with_markers)
    text = 'Now [CALL] w1 [HEAD] get_weather(city="Oslo") [END] and [TRAP] [END] then é ü done'
    mon = CMLMonitor(tok)
    events = []
    for tid in tok.encode(text, add_special_tokens=False):
        events += mon.feed_token(tid)
    events += mon.flush()
    blocks = [(b.kind, b.call_id, b.body) for b in events if isinstance(b, Block)]
    assert blocks == [(b.kind, b.call_id, b.body) for b in parse_blocks(text)]
    assert "".join(e.text for e in events if isinstance(e, TextEvent)) == visible_text(text)


def test_monitor_masks_only_intr_on_the_text_path():
    tok = tiny_tokenizer(with_markers=False)
    mon = CMLMonitor(tok)
    for tid in tok.encode("x [INTR", add_special_tokens=False):
        mon.feed_token(tid)
    assert mon.parser.tail == "[INTR"
    scores = mon.mask_scores(torch.zeros(1, len(tok)))
    banned = set(torch.isinf(scores[0]).nonzero().flatten().tolist())
    expected = {i for i in range(len(tok)) if tok.convert_ids_to_tokens(i).startswith("]") or "[INTR]" in tok.convert_ids_to_tokens(i)}
    assert banned and banned == expected
    # other markers stay allowed
    mon2 = CMLMonitor(tok)
    for tid in tok.encode("x [CA", add_special_tokens=False):
        mon2.feed_token(tid)
    scores2 = mon2.mask_scores(torch.zeros(1, len(tok)))
    assert not torch.isinf(scores2).any()
