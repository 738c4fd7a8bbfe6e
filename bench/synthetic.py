"""Synthetic data in the tutorial's format, at the tutorial's size: a seeded corpus of made-up technical text and
QA examples whose questions share words with their gold documents (bench/jobs.py, bench/programs.py)."""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path

TERMS = """kernel socket thread mutex buffer cache proxy daemon shell script config cluster container volume image
registry branch commit merge rebase remote origin upstream patch diff stash index packet route gateway
subnet firewall port tunnel certificate cipher hash salt token session cookie header query schema table
column join cursor transaction lock replica shard partition backup snapshot journal compiler linker loader
library module package dependency version release build artifact pipeline runner stack heap pointer
closure iterator generator coroutine callback promise event loop signal process service timer cron log
archive mount filesystem inode driver firmware boot display keyboard printer network interface address
resolver domain mail relay queue broker topic consumer producer array vector matrix string integer object
class method field decorator permission user group sudo password terminal editor plugin extension browser
server client request response endpoint latency timeout retry quota memory swap disk cpu core scheduler"""
FUNCTION_WORDS = "the a of to in and is that for it with as on be this you can or by not are if from".split()
VERBS = "configure install remove update restart debug fix enable disable mount share sync migrate deploy".split()
ONSETS, VOWELS, CODAS = "b c d f g k l m n p r s t v z br tr st pl gr".split(), "a e i o u ai eo".split(), \
    ["", "", "n", "x", "r", "s", "th", "ck"]


class TextMaker:
    """A vocabulary (function words, then technical terms, then made-up words: rank order) drawn with Zipf
    weights, cut into capitalized sentences of 6-20 words."""

    def __init__(self, rng: random.Random, size: int = 6000):
        terms, made_up = TERMS.split(), set()
        rng.shuffle(terms)
        while len(made_up) < size - len(FUNCTION_WORDS) - len(terms):
            made_up.add("".join(rng.choice(ONSETS) + rng.choice(VOWELS) for _ in range(rng.randint(2, 3)))
                        + rng.choice(CODAS))
        self.rng, self.words = rng, FUNCTION_WORDS + terms + sorted(made_up)
        self.cum_weights = list(itertools.accumulate(1.0 / rank for rank in range(1, len(self.words) + 1)))

    def text(self, n_words: int, seed_words: tuple[str, ...] = ()) -> str:
        words = self.rng.choices(self.words, cum_weights=self.cum_weights, k=n_words)
        for w in seed_words:  # topic words, so a question's gold documents share words with it
            words[self.rng.randrange(n_words)] = w
        sentences, i = [], 0
        while i < n_words:
            sentence = " ".join(words[i:i + (n := self.rng.randint(6, 20))])
            sentences.append(sentence[:1].upper() + sentence[1:] + ".")
            i += n
        return " ".join(sentences)


def generate(data_dir: Path, n_docs: int, n_examples: int, seed: int) -> None:
    """Write ragqa_arena_tech_{corpus,examples}.jsonl (deterministic for a seed), unless they are there."""
    paths = {kind: data_dir / f"ragqa_arena_tech_{kind}.jsonl" for kind in ("corpus", "examples")}
    if all(p.exists() for p in paths.values()):
        return
    data_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    maker = TextMaker(rng)
    doc_ids, topics = rng.sample(range(1, 10 * n_docs), n_docs), {}  # topics: a few words of the doc, for questions
    terms = maker.words[len(FUNCTION_WORDS):len(FUNCTION_WORDS) + 600]
    with open(paths["corpus"], "w") as f:
        for doc_id in doc_ids:
            # Log-normal length: median ~150 words (~1 kB), about 2% past the tutorial's 6000-char cut.
            n_words = min(1400, max(15, int(rng.lognormvariate(math.log(150), 0.8))))
            topic = topics[doc_id] = rng.sample(terms, 4)
            author = " ".join(w.capitalize() for w in rng.sample(maker.words[-3000:], 2))
            f.write(json.dumps({"doc_id": doc_id, "author": author, "text": maker.text(n_words, tuple(topic) * 3)})
                    + "\n")
    with open(paths["examples"], "w") as f:
        for _ in range(n_examples):
            gold = rng.sample(doc_ids, rng.randint(1, 3))
            topic = topics[gold[0]]
            question = f"how do i {rng.choice(VERBS)} the {topic[0]} {topic[1]} with {topic[2]}?"
            response = maker.text(rng.randint(100, 300), tuple(topic) * 2)
            f.write(json.dumps({"question": question, "response": response, "gold_doc_ids": gold}) + "\n")
