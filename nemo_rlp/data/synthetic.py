"""Deterministic synthetic corpus in which some next tokens need a small computation.

The bundled tiny corpus (``nemo_rlp/data/assets/tiny_corpus.jsonl``) lets RLP run end to end on a CPU:
its documents are short "worksheets" whose answers follow from a computation that a thought could do.
Two kinds carry the demo (MARKED_TASKS): walks along a fixed map of roads learned by heart, and
multi-step word problems; the others (in-context lookups, counting, number patterns, two-digit
arithmetic, orderings) are text around them. A fraction of episodes (``thought_fraction``) show a
worked thought right before their answer, so plain next-token pretraining already teaches the
``<think> … </think>`` format; the answers of walks and word problems shown without one are marked
(``answers``), for RLP and the held-out evaluation (``nemo_rlp.data.marked``).

Thoughts are written the way RLP inserts them at the token level: the marker directly follows the
context (no space before ``<think>``) and the text after ``</think>`` is exactly the document's
continuation, e.g. ``"Now Tom has<think> 3 + 4 = 7, 7 - 2 = 5</think> 5 apples."``. With the bundled
byte-level tokenizer the ids of such a document are the ids of the thought-free document with the
marker/thought ids spliced in before the answer token, which is what a rollout produces.

Everything is drawn from one ``random.Random(seed)``, so a :class:`CorpusConfig` always gives the same
text; :func:`build_tiny_corpus` also trains the tokenizer and writes the files byte-identically on
every run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from nemo_rlp.data.tokenizer import DEFAULT_SPECIAL_TOKENS, train_byte_level_bpe

__all__ = [
    "CORPUS_FILENAME",
    "TOKENIZER_FILENAME",
    "CorpusConfig",
    "build_tiny_corpus",
    "generate_documents",
    "iter_documents",
    "iter_records",
    "write_jsonl",
]

CORPUS_FILENAME = "tiny_corpus.jsonl"
TOKENIZER_FILENAME = "tokenizer.json"
THINK_START, THINK_END = DEFAULT_SPECIAL_TOKENS[2], DEFAULT_SPECIAL_TOKENS[3]
_LONGEST_EPISODE_WORDS = 75  # a lookup with four facts stated twice, plus thought (checked in tests)
_ANSWER_MARK = "\x00"  # marks an answer's start while a document is assembled; never written out


@dataclass(frozen=True)
class CorpusConfig:
    """What to generate. Defaults produce the bundled corpus."""

    num_docs: int = 5000
    seed: int = 1234
    thought_fraction: float = 0.8  # share of episodes that show a thought before their answer
    # Share of the walks' and word problems' shown thoughts that do the work; the rest are filler
    # ("let me think, ok"): the answer still follows them, so next-token prediction learns to write
    # the corpus's mix of thoughts, and only a reward for thoughts that predict the answer (RLP)
    # prefers the useful ones. 1.0: every shown thought is worked (the corpus before RLP's own demo).
    useful_thought_fraction: float = 0.5
    # Share of them that are worked but wrong (one step slips; the right answer still follows), so
    # that a model learns how far to trust a worked thought; the rest are filler.
    wrong_thought_fraction: float = 0.0
    # The episode kinds whose answers are marked (RLP's positions and the held-out evaluation's) and
    # whose shown thoughts follow the fractions above; the other kinds are text around them.
    marked_tasks: tuple[str, ...] = ("walk",)
    min_words: int = 20
    max_words: int = 120
    heldout: bool = False  # walks start only in HELDOUT_STARTS (else never there)

    def __post_init__(self) -> None:
        if self.num_docs < 1:
            raise ValueError(f"num_docs must be >= 1, got {self.num_docs}")
        for name in ("thought_fraction", "useful_thought_fraction", "wrong_thought_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.useful_thought_fraction + self.wrong_thought_fraction > 1.0:
            raise ValueError("useful_thought_fraction + wrong_thought_fraction must be <= 1, got "
                             f"{self.useful_thought_fraction} + {self.wrong_thought_fraction}")
        # The gap must hold the longest episode, so a document below min_words can always grow.
        if not (1 <= self.min_words and self.min_words + _LONGEST_EPISODE_WORDS <= self.max_words):
            raise ValueError(
                f"need 1 <= min_words and min_words + {_LONGEST_EPISODE_WORDS} <= max_words, "
                f"got min_words={self.min_words}, max_words={self.max_words}"
            )


# --- vocabulary --------------------------------------------------------------------------------------

_PEOPLE = [
    ("Tom", "He"), ("Anna", "She"), ("Ben", "He"), ("Mia", "She"), ("Sam", "He"), ("Lily", "She"),
    ("Max", "He"), ("Zoe", "She"), ("Leo", "He"), ("Emma", "She"), ("Jack", "He"), ("Nora", "She"),
]
_ITEMS = [
    ("apple", "apples"), ("pencil", "pencils"), ("coin", "coins"), ("book", "books"), ("marble", "marbles"),
    ("cookie", "cookies"), ("card", "cards"), ("shell", "shells"), ("stamp", "stamps"), ("egg", "eggs"),
]
_LIST_WORDS = [
    ["apple", "pear", "plum", "fig", "lime"],
    ["red", "blue", "green", "pink", "gold"],
    ["cat", "dog", "fox", "owl", "bee"],
]
_COLORS = ["red", "blue", "green", "yellow", "black", "white", "pink", "brown"]
# Filler thoughts: the words of a thought that does no work. Drawn 1-3 at a time.
_FILLER = [
    "let me think", "ok", "hmm", "one moment", "I know this one", "this is easy", "let me see",
    "right", "so", "wait", "think it through", "I remember", "yes", "easy one", "let me check",
]
_SYLLABLES = ["ka", "lo", "mi", "ra", "te", "vo", "zu", "ne", "po", "si", "da", "fe", "gu", "ri", "bel", "mar", "tor"]
def _world_map(seed: int = 2510, size: int = 40) -> tuple[list[str], dict[str, str]]:
    """A fixed map shared by every document: ``size`` towns on one circular road (each town has one
    road out and one in, in a random order).

    The same for every corpus seed, so the roads are facts a model can learn by heart (as it learns
    world knowledge in pretraining), while a walk of several roads has to be composed. One cycle
    through all towns keeps every walk's end uniform: no town is a likelier answer than another."""
    rng = random.Random(seed)
    consonants, vowels = "bdfgklmnprstvz", "aeiou"
    towns: list[str] = []
    while len(towns) < size:
        name = "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(2)).capitalize()
        if name not in towns:
            towns.append(name)
    order = rng.sample(towns, size)
    return towns, {a: b for a, b in zip(order, order[1:] + order[:1])}


TOWNS, ROADS = _world_map()
# Three-road walks from these towns are never asked in the training corpus (two-road walks from them
# are, and every road is stated): the held-out set asks exactly those, so no answer can be recalled
# from a memorised walk, while every step of the thought is one the model has written before.
HELDOUT_STARTS = frozenset(TOWNS[::4])
_COMPARATIVES = [("taller", "tallest"), ("older", "oldest"), ("faster", "fastest"), ("stronger", "strongest")]


# --- episodes ----------------------------------------------------------------------------------------


class _Episodes:
    """Builds the short episodes a document is made of; each returns text ending with a period."""

    def __init__(self, rng: random.Random, show_thoughts: bool, heldout: bool = False) -> None:
        self.rng = rng
        self.show_thoughts = show_thoughts
        self.heldout = heldout
        self.mark_answers = True  # set per episode by _document (MARKED_TASKS)
        self.filler = False  # set per episode by _document: the shown thought is filler, not the work
        self.wrong = False  # set per episode by _document: the shown thought slips at its last step

    def answer(self, thought: str, answer: str) -> str:
        """``answer`` (which starts with a space), preceded by ``<think>thought</think>`` if shown.

        In a document without thoughts the answer of a marked episode is preceded by
        :data:`_ANSWER_MARK`, which :func:`_document` turns into the answer's character offset."""
        if self.show_thoughts:
            if self.filler:
                thought = ", ".join(self.rng.sample(_FILLER, self.rng.randint(1, 3)))
            return f"{THINK_START} {thought}{THINK_END}{answer}"
        return (_ANSWER_MARK if self.mark_answers else "") + answer

    def all(self) -> list[Callable[[], str]]:
        return [self.walk, self.story, self.lookup, self.counting, self.sequence, self.arithmetic, self.ordering]

    def walk(self) -> str:
        """Roads of the fixed world map (facts), or a walk along two or three of them:
        "Walk 3 roads from Kalo to" and the answer " Mira".

        The thought names the towns one road at a time (" Kalo -> Sune -> Bofa -> Mira"): each step is
        a road learned by heart and the start is the word right before the thought, while answering
        without a thought composes the roads in one forward pass (which small models fail to do for
        walks they have never seen asked: the held-out three-road walks, see HELDOUT_STARTS).
        """
        rng = self.rng
        if rng.random() < 0.3:
            return " ".join(f"Road: {t} -> {ROADS[t]}." for t in rng.sample(TOWNS, rng.randint(2, 4)))
        path = [rng.choice(sorted(HELDOUT_STARTS) if self.heldout else TOWNS)]
        hops = 3 if self.heldout else (2 if path[0] in HELDOUT_STARTS else rng.randint(2, 3))
        for _ in range(hops):
            path.append(ROADS[path[-1]])
        shown = path[:-1] + [rng.choice([t for t in TOWNS if t != path[-1]])] if self.wrong else path
        return f"Walk {len(path) - 1} roads from {path[0]} to" + self.answer(" -> ".join(shown), f" {path[-1]}") + "."

    def story(self) -> str:
        """Multi-step word problem: "Tom has 3 apples. He buys 4 more ... Now Tom has 5 apples."."""
        rng = self.rng
        (name, pron), (one, many) = rng.choice(_PEOPLE), rng.choice(_ITEMS)
        other = rng.choice([p for p, _ in _PEOPLE if p != name])
        value = rng.randint(1, 9)
        text = [f"{name} has {value} {one if value == 1 else many}."]
        steps = []
        for i in range(rng.randint(1, 3)):
            if value > 0 and rng.random() < 0.45:
                n = rng.randint(1, value)
                phrase = rng.choice([f"gives {n} away", f"loses {n}", f"gives {n} to {other}"])
                steps.append(f"{value} - {n} = {value - n}")
                value -= n
            else:
                n = rng.randint(1, 9)
                phrase = rng.choice([f"buys {n} more", f"finds {n} more", f"gets {n} more from {other}"])
                steps.append(f"{value} + {n} = {value + n}")
                value += n
            text.append(f"{pron if i == 0 else 'Then ' + pron.lower()} {phrase}.")
        lead = rng.choice([f"Now {name} has", f"How many {many} does {name} have now? {name} has"])
        noun = one if value == 1 else many
        if self.wrong:  # the last step's result slips by 1-3
            head, _, result = steps[-1].rpartition(" = ")
            steps[-1] = f"{head} = {max(0, int(result) + rng.choice([-3, -2, -1, 1, 2, 3])) or int(result) + 1}"
        text.append(lead + self.answer(", ".join(steps), f" {value}") + f" {noun}.")
        return " ".join(text)

    def _invented_names(self, k: int) -> list[str]:
        names: list[str] = []
        while len(names) < k:
            name = "".join(self.rng.choice(_SYLLABLES) for _ in range(self.rng.randint(2, 3))).capitalize()
            if name not in names:
                names.append(name)
        return names

    def lookup(self) -> str:
        """In-context facts stated (sometimes twice), then one of them queried."""
        rng = self.rng
        k = rng.randint(3, 5)
        kind = rng.randrange(3)
        if kind == 0:  # invented countries and capitals: only the context can tell the answer
            keys, values = self._invented_names(k), self._invented_names(k)
            fact = "The capital of {} is {}."
            ask = "What is the capital of {0}? The capital of {0} is"
        elif kind == 1:
            keys, values = rng.sample(_COLORS, k), [str(rng.randint(0, 9)) for _ in range(k)]
            fact = "The {} box holds the number {}."
            ask = "Which number is in the {0} box? The {0} box holds the number"
        else:
            keys = rng.sample([p for p, _ in _PEOPLE], k)
            values = [str(rng.randint(10, 99)) for _ in range(k)]
            fact = "{} lives in room {}."
            ask = "Where does {0} live? {0} lives in room"
        facts = [fact.format(a, b) for a, b in zip(keys, values)]
        if k <= 4 and rng.random() < 0.5:  # restate the facts in a new order before the query
            facts += rng.sample(facts, len(facts))
        i = rng.randrange(k)
        query = ask.format(keys[i]) + self.answer(f"{keys[i]} -> {values[i]}", f" {values[i]}") + "."
        return " ".join(facts + [query])

    def counting(self) -> str:
        """How many times a word occurs in a short list."""
        rng = self.rng
        words = rng.choice(_LIST_WORDS)
        items = [rng.choice(words) for _ in range(rng.randint(4, 10))]
        target = rng.choice(items)
        positions = [str(j + 1) for j, w in enumerate(items) if w == target]
        count = len(positions)
        thought = f"{target} at {' '.join(positions)}, so {count}"
        return (
            f"Here is a list: {', '.join(items)}. How many times does {target} appear? It appears"
            + self.answer(thought, f" {count}")
            + (" time." if count == 1 else " times.")
        )

    def sequence(self) -> str:
        """A number pattern with a worked step before one of its terms."""
        rng = self.rng
        kind = rng.randrange(3)
        n = rng.randint(6, 9)
        if kind == 0:
            start, step = rng.randint(0, 20), rng.randint(1, 9)
            terms, op = [start + step * j for j in range(n)], f"+ {step}"
            lead = rng.choice([f"Count by {step}:", "The numbers go", "Pattern:"])
        elif kind == 1:
            start = rng.randint(1, 5)
            n = rng.randint(5, 7)
            terms, op = [start * 2**j for j in range(n)], "x 2"
            lead = rng.choice(["Each number doubles:", "Pattern:"])
        else:
            step = rng.randint(1, 5)
            start = step * (n - 1) + rng.randint(0, 10)
            terms, op = [start - step * j for j in range(n)], f"- {step}"
            lead = rng.choice(["Counting down:", "Pattern:"])
        j = rng.randint(3, n - 1)  # the worked term: at least three terms show the rule first
        head = lead + "".join(f" {t}" for t in terms[:j])
        tail = "".join(f" {t}" for t in terms[j + 1 :])
        return head + self.answer(f"{terms[j - 1]} {op} = {terms[j]}", f" {terms[j]}") + tail + "."

    def arithmetic(self) -> str:
        """Two-digit addition / subtraction or a small product, with the digit-level steps as thought."""
        rng = self.rng
        kind = rng.randrange(3)
        if kind == 0:
            a, b = rng.randint(10, 89), rng.randint(10, 89)
            ones, tens = a % 10 + b % 10, (a // 10 + b // 10) * 10
            thought = (
                f"{a % 10} + {b % 10} = {ones}, {a // 10 * 10} + {b // 10 * 10} = {tens}, {tens} + {ones} = {a + b}"
            )
            expr, result = f"{a} + {b}", a + b
        elif kind == 1:
            a = rng.randint(20, 99)
            b = rng.randint(10, a)
            thought = f"{a} - {b // 10 * 10} = {a - b // 10 * 10}, {a - b // 10 * 10} - {b % 10} = {a - b}"
            expr, result = f"{a} - {b}", a - b
        else:
            a, b = rng.randint(2, 9), rng.randint(2, 5)
            thought = ", ".join(str(a * j) for j in range(1, b + 1))  # repeated addition
            expr, result = f"{a} x {b}", a * b
        lead = rng.choice([f"What is {expr}? {expr} =", f"Compute {expr}. The result is"])
        return lead + self.answer(thought, f" {result}") + "."

    def ordering(self) -> str:
        """Transitive ordering of people, or the larger of two numbers."""
        rng = self.rng
        if rng.random() < 0.3:
            a, b = rng.sample(range(10, 100), 2)
            big, small = max(a, b), min(a, b)
            lead = f"Which is larger, {a} or {b}? The larger number is"
            return lead + self.answer(f"{big} > {small}", f" {big}") + "."
        comp, sup = rng.choice(_COMPARATIVES)
        chain = rng.sample([p for p, _ in _PEOPLE], rng.randint(3, 4))
        facts = [f"{x} is {comp} than {y}." for x, y in zip(chain, chain[1:])]
        rng.shuffle(facts)
        question = f"Who is the {sup}? The {sup} is"
        return " ".join(facts) + " " + question + self.answer(" > ".join(chain), f" {chain[0]}") + "."


# --- documents ---------------------------------------------------------------------------------------


def _count_words(text: str) -> int:
    return len(text.replace(THINK_START, " ").replace(THINK_END, " ").split())


# How often each episode kind is drawn. Walks and stories are two thirds: their answers are the marked
# ones (MARKED_TASKS), where a thought computes what a small model cannot in one forward pass (a walk
# along memorised roads, a running sum). The other kinds are unmarked text around them: their thoughts
# (counting, two-digit arithmetic, in-context lookups) are beyond a model of the demo's size in minutes.
MARKED_TASKS = frozenset(CorpusConfig.marked_tasks)
EPISODE_WEIGHTS = {
    "walk": 5, "story": 5, "lookup": 1, "counting": 1, "sequence": 1, "arithmetic": 1, "ordering": 1,
}


def _document(rng: random.Random, cfg: CorpusConfig) -> dict:
    """One document: ``{"text": str, "answers": [char offset, ...], "tasks": [episode kind, ...]}``.

    ``answers`` are the offsets of the answers' first characters (the space before the answer word) of
    the MARKED_TASKS episodes: the RLP positions of the demo and of the held-out evaluation. Only
    episodes without a worked thought have them; in the others the answer already follows a thought.
    """
    episodes = _Episodes(rng, show_thoughts=False, heldout=cfg.heldout)
    kinds = episodes.all()
    weights = [EPISODE_WEIGHTS[k.__name__] for k in kinds]
    # Skew lengths toward short documents (target mean min + range / 4) to keep the bundled file small.
    target = cfg.min_words + int((cfg.max_words - cfg.min_words) * rng.random() ** 3)
    parts: list[tuple[str, str]] = []
    words = 0
    while words < target:
        kind = rng.choices(kinds, weights)[0]
        episodes.mark_answers = kind.__name__ in cfg.marked_tasks
        # Per episode, so that a reader (the no-think teacher too) cannot tell from the document
        # whether the next answer comes after a thought.
        episodes.show_thoughts = rng.random() < cfg.thought_fraction
        kind_draw = rng.random() if episodes.mark_answers else 0.0
        episodes.filler = kind_draw >= cfg.useful_thought_fraction + cfg.wrong_thought_fraction
        episodes.wrong = not episodes.filler and kind_draw >= cfg.useful_thought_fraction
        episode = kind()
        n = _count_words(episode)
        if words + n > cfg.max_words:
            if words >= cfg.min_words:
                break
            continue  # too long for what is left: draw another (episodes are <= 60 words, so one fits)
        parts.append((kind.__name__, episode))
        words += n
    text, answers, tasks = "", [], []
    for name, episode in parts:
        text += " " if text else ""
        for piece in episode.split(_ANSWER_MARK)[:-1]:
            text += piece
            answers.append(len(text))
            tasks.append(name)
        text += episode.split(_ANSWER_MARK)[-1]
    return {"text": text, "answers": answers, "tasks": tasks}


def iter_records(cfg: CorpusConfig = CorpusConfig()) -> Iterator[dict]:
    """Yield ``cfg.num_docs`` documents (``{"text", "answers", "tasks"}``, see :func:`_document`), all
    drawn from ``random.Random(cfg.seed)``."""
    rng = random.Random(cfg.seed)
    for _ in range(cfg.num_docs):
        yield _document(rng, cfg)


def iter_documents(cfg: CorpusConfig = CorpusConfig()) -> Iterator[str]:
    """The texts of :func:`iter_records`."""
    for record in iter_records(cfg):
        yield record["text"]


def generate_documents(num_docs: int = 5000, seed: int = 1234, thought_fraction: float = 0.3) -> list[str]:
    """The texts of :func:`iter_documents` as a list."""
    return list(iter_documents(CorpusConfig(num_docs=num_docs, seed=seed, thought_fraction=thought_fraction)))


def write_jsonl(records: Sequence[str | dict], path: str | os.PathLike[str], text_key: str = "text") -> None:
    """One JSON object per line (a text becomes ``{text_key: text}``), UTF-8, ``\\n`` line ends
    (byte-identical on every OS)."""
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for record in records:
            f.write(json.dumps({text_key: record} if isinstance(record, str) else record, ensure_ascii=False) + "\n")


HELDOUT_FILENAME = "tiny_heldout.jsonl"
# The held-out worksheets: another seed, no worked thoughts (every answer is marked).
HELDOUT = CorpusConfig(num_docs=500, seed=98765, thought_fraction=0.0, heldout=True)


def build_tiny_corpus(
    out_dir: str | os.PathLike[str],
    cfg: CorpusConfig = CorpusConfig(),
    vocab_size: int = 1024,
    heldout: CorpusConfig | None = HELDOUT,
) -> tuple[Path, Path]:
    """Write ``tiny_corpus.jsonl``, a byte-level BPE ``tokenizer.json`` trained on it and (unless
    ``heldout`` is None) the held-out ``tiny_heldout.jsonl`` into ``out_dir``. Documents are
    ``{"text", "answers", "tasks"}`` objects (:func:`_document`).

    Returns the paths of the corpus and the tokenizer. The special tokens ``<pad>``, ``<|endoftext|>``,
    ``<think>``, ``</think>`` get ids 0-3.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = list(iter_records(cfg))
    corpus_path, tokenizer_path = out / CORPUS_FILENAME, out / TOKENIZER_FILENAME
    write_jsonl(records, corpus_path)
    if heldout is not None:  # the held-out set asks the tasks the corpus marks
        heldout = dataclasses.replace(heldout, marked_tasks=cfg.marked_tasks)
        write_jsonl(list(iter_records(heldout)), out / HELDOUT_FILENAME)
    texts = [r["text"] for r in records]
    tok = train_byte_level_bpe(texts, vocab_size=vocab_size, special_tokens=DEFAULT_SPECIAL_TOKENS)
    tok.save(str(tokenizer_path), pretty=True)
    return corpus_path, tokenizer_path
