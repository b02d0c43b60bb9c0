"""CodeGen's truncation rules, and that stopping early gives the post-hoc result."""

from __future__ import annotations

import random

import pytest

from codegen_repl.core.truncation import Cutter, truncate


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("x = 1\nprint(x)\ny = 2\nprint(y)\n", "x = 1\nprint(x)\ny = 2\n"),
        ("def f():\n    pass\ndef g():\n    pass", "def f():\n    pass\n"),
        ("a = 1\n# next step\nb = 2", "a = 1\n"),
        ("a = 1  # a comment stays\nb = 2", "a = 1  # a comment stays\nb = 2"),
        ("a = 1<|endoftext|>junk", "a = 1"),
        ("a = 1\n'''doc'''\n", "a = 1\n"),
        ('a = 1\n"""doc"""\n', "a = 1\n"),
        ("a = 1\n\n\nb = 2", "a = 1"),
        ("    print(1)\n    print(2)\n", "    print(1)\n    print(2)\n"),  # not top level
        ("#only a comment", ""),
        (  # the reference example of the Session issue
            "\nif len_a > len_b:\n    result = a\nelse:\n    result = b\n\n\n\n#",
            "\nif len_a > len_b:\n    result = a\nelse:\n    result = b",
        ),
    ],
)
def test_truncate(completion: str, expected: str) -> None:
    assert truncate(completion) == expected


def test_stop_strings_cut_before_the_first() -> None:
    cutter = Cutter(codegen_rules=False, stop=("END", "\nif"))
    assert cutter.apply("abc\nif x END") == "abc"
    assert cutter.apply("no stop here") == "no stop here"


PIECES = ["x", " = ", "1", "\n", "\n\n", "print(", "def ", "#", "'''", '"""', "<|endoftext|>",
          "<|end", "oftext|>", "pri", "nt", "de", "f", "    ", "STOP", "ST", "OP", "é"]  # fmt: skip


@pytest.mark.parametrize("rules", [True, False])
def test_stopping_as_soon_as_final_equals_post_hoc_truncation(rules: bool) -> None:
    """Stream random code-like text in random pieces; where `final` first fires, the kept text
    must equal the cut of the whole text, and what was shown must be a prefix of it."""
    rng = random.Random(0)
    cutter = Cutter(codegen_rules=rules, stop=("STOP",))
    stopped_early = 0
    for _ in range(3000):
        pieces = rng.choices(PIECES, k=rng.randint(1, 30))
        whole = "".join(pieces)
        expected = cutter.apply(whole)
        text = ""
        for piece in pieces:
            text += piece
            assert expected.startswith(text[: cutter.visible(text)])
            cut = cutter.final(text)
            if cut is not None:
                assert text[:cut] == expected
                stopped_early += text != whole
                break
    assert stopped_early > 500


def test_settled_holds_back_a_possible_start() -> None:
    cutter = Cutter()
    assert cutter.settled("a = 1\n\n") == len("a = 1")
    assert cutter.settled("a = 1\npri") == len("a = 1\n")
    assert cutter.settled("a = 1\nb") == len("a = 1\nb")
    assert cutter.settled("x <|endof") == len("x ")


def test_eos_ends_a_sample_even_where_no_stop_rule_fires() -> None:
    from codegen_repl.core.decoding import SampleText

    class Ids:  # a tokenizer of single characters; id 0 is EOS
        eos_token_id = 0

        def decode(self, ids: list[int]) -> str:
            return "".join(chr(i) for i in ids)

    sample = SampleText(Ids(), Cutter(codegen_rules=True))  # type: ignore[arg-type]
    sample.add([ord(c) for c in "x = 1\n\n"])
    sample.add([0, ord("#"), ord("y")])
    assert sample.done and sample.text == "x = 1\n\n" and sample.result() == "x = 1\n\n"
    assert sample.take() == "x = 1\n\n" and sample.take(finished=True) == ""
