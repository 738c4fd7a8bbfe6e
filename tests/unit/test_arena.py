"""RAG-QA Arena's pairwise protocol against DSPy's DummyLM: verdicts 1/2/0 read by where the program's answer
was shown, both orders and the flip rate, an unparseable verdict left unscored, the user's few-shot file."""

import json

import dspy
import pytest
from dspy.utils import DummyLM

from pipelines.config import compose
from pipelines.errors import ConfigError
from pipelines.evaluation import arena
from pipelines.evaluation.scoring import Scorer, Scoring

QUESTIONS = [f"how do I fix problem {i}?" for i in range(8)]
SHOWN_FIRST = next(q for q in QUESTIONS if arena.program_first(q))
SHOWN_SECOND = next(q for q in QUESTIONS if not arena.program_first(q))
PROGRAM, GOLD = "the program's answer", "the gold answer"


def judged(verdicts, question, *, both_orders=False, demos=()):
    """The outcome of a judge whose LM says `verdicts` in turn, and the prompts it was shown."""
    lm = DummyLM([{"reasoning": f"reason {i}", "verdict": v} for i, v in enumerate(verdicts)])
    judge = arena.ArenaJudge(lm, settings=arena.Settings(demos=demos, both_orders=both_orders))
    example = dspy.Example(question=question, response=GOLD).with_inputs("question")
    outcome = judge(example, dspy.Prediction(response=PROGRAM))
    return outcome, judge, [call["messages"] for call in lm.history]


def shown(messages) -> tuple[str, str]:
    """What the judge's last message showed as answer 1 and answer 2."""
    text = messages[-1]["content"]
    one = text.split("[[ ## answer_1 ## ]]\n", 1)[1].split("\n", 1)[0]
    two = text.split("[[ ## answer_2 ## ]]\n", 1)[1].split("\n", 1)[0]
    return one, two


def values(outcome) -> tuple:
    return tuple(outcome.value(m) for m in arena.METRICS)


@pytest.mark.parametrize("question, first", [(SHOWN_FIRST, True), (SHOWN_SECOND, False)])
@pytest.mark.parametrize("verdict", ["1", "2", "0"])
def test_a_verdict_counts_for_the_side_shown_where_it_points(question, first, verdict):
    outcome, judge, prompts = judged([verdict], question)
    assert len(prompts) == 1 and shown(prompts[0]) == ((PROGRAM, GOLD) if first else (GOLD, PROGRAM))
    program_won = verdict == ("1" if first else "2")
    # 0 is "not sure", a tie as the benchmark counts it; the flip rate needs both orders.
    expected = (100.0 if program_won else 0.0, 100.0 if program_won or verdict == "0" else 0.0, None)
    assert values(outcome) == expected
    assert f"program's answer shown as {1 if first else 2}; judge: {verdict}" in outcome.rationale
    assert "reason 0" in outcome.rationale and judge.failures == 0


@pytest.mark.parametrize("said", ["A", "3", "tie", ""])
def test_a_verdict_that_is_not_1_2_or_0_is_not_scored_and_is_counted(said):
    outcome, judge, _ = judged([said], SHOWN_FIRST)  # DSPy retries with JSON; the dummy has nothing more to say
    assert outcome.failed and values(outcome) == (None, None, None)
    assert judge.failures == 1 and "the judge gave no verdict" in outcome.rationale


@pytest.mark.parametrize("verdicts, expected", [
    (["1", "2"], (100.0, 100.0, 0.0)),    # the program's answer both times: a win, the order changed nothing
    (["2", "1"], (0.0, 0.0, 0.0)),        # the gold answer both times: a loss
    (["1", "1"], (0.0, 100.0, 100.0)),    # whatever is shown first: a tie, and a flip
    (["2", "2"], (0.0, 100.0, 100.0)),    # whatever is shown second
    (["1", "0"], (0.0, 100.0, 100.0)),    # one win and one "not sure": a tie, and it changed with the order
    (["0", "0"], (0.0, 100.0, 0.0)),      # not sure either way: a tie, no flip
])
def test_both_orders_win_only_when_both_verdicts_agree_and_report_the_flip(verdicts, expected):
    outcome, _, prompts = judged(verdicts, SHOWN_SECOND, both_orders=True)
    assert [shown(p) for p in prompts] == [(PROGRAM, GOLD), (GOLD, PROGRAM)]
    assert values(outcome) == expected
    assert ("changed" if expected[2] else "held") in outcome.rationale.splitlines()[-1]


def test_one_failed_order_leaves_the_whole_example_unscored():
    outcome, judge, _ = judged(["1", "maybe"], SHOWN_FIRST, both_orders=True)
    assert outcome.failed and values(outcome) == (None, None, None) and judge.failures == 1


def write(tmp_path, *rows) -> str:
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


PAIR = {"question": "how do I undo a commit?", "answer_1": "git reset --soft HEAD~1", "answer_2": "delete .git",
        "verdict": 1, "reasoning": "answer 2 destroys the repository"}


def test_few_shot_pairs_reach_the_judge_before_the_question(tmp_path):
    unreasoned = {**PAIR, "question": "what does git stash do?", "verdict": "0", "reasoning": ""}
    path = write(tmp_path, PAIR, "", unreasoned)  # a blank line is skipped
    demos = arena.read_demos(path)
    assert demos == (arena.Demo(question=PAIR["question"], answer_1=PAIR["answer_1"], answer_2=PAIR["answer_2"],
                                verdict="1", reasoning=PAIR["reasoning"]),
                     arena.Demo(question="what does git stash do?", answer_1=PAIR["answer_1"],
                                answer_2=PAIR["answer_2"], verdict="0"))
    _, _, prompts = judged(["1"], SHOWN_FIRST, demos=demos)
    # Each pair is a turn of its own, before the question: the user shows it, the assistant gives its verdict
    # (DSPy puts a pair without reasoning first, and says that a field is missing).
    assert [m["role"] for m in prompts[0]] == ["system", "user", "assistant", "user", "assistant", "user"]
    turns = [m["content"] for m in prompts[0][1:5]]
    assert "what does git stash do?" in turns[0] and "Not supplied" in turns[1] and "0" in turns[1].split()
    assert PAIR["question"] in turns[2] and "answer 2 destroys the repository\n\n[[ ## verdict ## ]]\n1" in turns[3]
    assert SHOWN_FIRST in prompts[0][-1]["content"] and PAIR["question"] not in prompts[0][-1]["content"]
    _, _, plain = judged(["1"], SHOWN_FIRST)
    assert len(plain[0]) == 2 and "destroys" not in str(plain[0])


@pytest.mark.parametrize("row, message", [
    ("{not json", "row 2: Expecting property name"),
    ({k: v for k, v in PAIR.items() if k != "verdict"}, "row 2: missing verdict"),
    ({**PAIR, "label": "1"}, "row 2: unknown label"),
    ({**PAIR, "verdict": 3}, "row 2: verdict 3 is not 1, 2 or 0"),
    ({**PAIR, "verdict": "A"}, "row 2: verdict 'A' is not 1, 2 or 0"),
    ({**PAIR, "verdict": True}, "row 2: verdict True is not 1, 2 or 0"),
    ({**PAIR, "answer_2": " "}, "row 2: question, answer_1, answer_2 must be non-empty text"),
    ({**PAIR, "reasoning": 5}, "row 2: reasoning must be text"),
    ([PAIR], "row 2: not a JSON object"),
])
def test_a_bad_few_shot_row_is_one_line_naming_the_file_and_row(tmp_path, row, message):
    path = write(tmp_path, PAIR, row)
    with pytest.raises(ConfigError) as error:
        arena.read_demos(path)
    assert str(error.value).startswith(f"scoring.arena.examples={path}, {message}")
    assert "\n" not in str(error.value)


def test_an_empty_or_missing_few_shot_file_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="no examples in it"):
        arena.read_demos(write(tmp_path, ""))
    with pytest.raises(ConfigError, match="cannot read it .No such file"):
        arena.read_demos(str(tmp_path / "nowhere.jsonl"))


def test_scoring_config_carries_the_arena_settings(tmp_path):
    arena_metrics = ["scoring.metrics=[token_f1,arena_win_rate]", "scoring.primary=token_f1"]
    plain = Scoring.from_cfg(compose("cot", arena_metrics).scoring)
    assert plain.arena == arena.Settings() and arena.FLIP not in plain.metrics  # one order, no few-shot: the default
    both = Scoring.from_cfg(compose("cot", [*arena_metrics, "scoring.arena.both_orders=true",
                                            f"scoring.arena.examples={write(tmp_path, PAIR)}"]).scoring)
    assert both.metrics == ("token_f1", "arena_win_rate", arena.FLIP) and len(both.arena.demos) == 1
    judge = Scorer.with_judges(both, DummyLM([])).pairwise
    assert judge.both_orders and len(judge.predict.demos) == 1
    # Without an arena metric there is nothing to flip.
    assert arena.FLIP not in Scoring.from_cfg(compose("cot", ["scoring.arena.both_orders=true"]).scoring).metrics
    with pytest.raises(ConfigError, match="row 1: verdict 7"):
        Scoring.from_cfg(compose("cot", [f"scoring.arena.examples={write(tmp_path, {**PAIR, 'verdict': 7})}"]).scoring)
