"""The task scorers of benchmarks/evaluate.py (issue 6): GSM8K answer extraction, ROUGE-L and the
HumanEval program built from a chat answer. A scorer that always failed (or always passed) would
make the published task table meaningless, so each is checked on passing and failing inputs."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ev():
    spec = importlib.util.spec_from_file_location("meswitch_evaluate", ROOT / "benchmarks" / "evaluate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gsm8k_final_number(ev):
    ref = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72"
    assert ev._final_number(ref) == "72"
    assert ev._same_number(ev._final_number("So she sold 72 clips."), ev._final_number(ref))
    assert ev._same_number(ev._final_number("#### 1,200"), "1200")
    assert ev._same_number(ev._final_number("The answer is 5.0"), "5")
    # the last number counts without "####"; a wrong or missing one does not match
    assert not ev._same_number(ev._final_number("72 clips, then 48 more"), "72")
    assert not ev._same_number(ev._final_number("I do not know"), "72")


def test_rouge_l(ev):
    assert ev.rouge_l("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(1.0)
    assert ev.rouge_l("", "anything") == 0.0
    assert ev.rouge_l("dogs bark", "the cat sat") == 0.0
    # LCS "the cat the mat" = 4 of 6 pred words and 4 of 6 ref words
    assert ev.rouge_l("the cat ran to the mat", "the cat sat on the mat") == pytest.approx(4 / 6)


PROBLEM = {
    "prompt": 'from typing import List\n\n\ndef total(xs: List[int]) -> int:\n    """Sum of xs.\n    >>> total([1, 2])\n    3\n    """\n',
    "entry_point": "total",
    "test": "def check(candidate):\n    assert candidate([1, 2]) == 3\n    assert candidate([]) == 0\n",
}


@pytest.mark.parametrize("answer, ok", [
    # whole function in a fenced block, with prose around it; it needs the prompt's List import
    ("Here it is:\n```python\ndef total(xs: List[int]) -> int:\n    return sum(xs)\n```\nDone.", True),
    # code first, closed by a bare fence (as the fine-tuned experts answer), then prose
    ("def total(xs):\n    return sum(xs)\n```\nThis sums the list.", True),
    # only the body: appended to the prompt's stub
    ("    return sum(xs)\n", True),
    # an unclosed block runs to the end
    ("```python\ndef total(xs):\n    s = 0\n    for x in xs:\n        s += x\n    return s\n", True),
    ("```python\ndef total(xs):\n    return len(xs)\n```", False),  # wrong
    # demo calls after the function, and an answer cut by the token limit: only definitions run
    ("def total(xs):\n    return sum(xs)\n\n# Test the function\nprint(total([1, 2]))\nxs = [1, 2,", True),
    ("```python\ndef total(xs):\n    return sum(xs)\nprint(undefined_name)\n```", True),
    ("I cannot help with that.", False),  # no code
    ("```python\ndef total(xs):\n    while True:\n        pass\n```", False),  # times out
])
def test_humaneval_program(ev, answer, ok):
    assert ev._run_program(ev.humaneval_program(PROBLEM, answer), timeout=3.0) is ok


def test_generation_stops(ev):
    # HumanEval: stop once the answer's code block is closed, not at its opening fence
    assert not ev._code_block_closed("Sure:\n```python\ndef total(xs):\n")
    assert ev._code_block_closed("Sure:\n```python\ndef total(xs):\n    return sum(xs)\n```")
    assert ev._code_block_closed("def total(xs):\n    return sum(xs)\n```")
    assert not ev._code_block_closed("    return sum(xs)\n")
    # GSM8K: stop after the '#### <number>' line
    assert not ev._gsm8k_done("3 + 4 = 7\n#### 7")  # the number may go on
    assert ev._gsm8k_done("3 + 4 = 7\n#### 7\n")
    assert not ev._gsm8k_done("3 + 4 = 7\n")
