"""The synthetic instruction world of the demo and the end-to-end tests (docs/WORLD.md).

A seed makes a small land: creatures, people and towns with syllable names, attributes (color, size, home,
foods, job, age, ...) and relations (friend, pet, mayor). From it `write_world` writes, byte for byte the
same for the same seed:

    pretrain.txt, pretrain_val.txt  text about the land in varied templates (facts repeated many times)
    prompts.jsonl                   raw user prompts: heavy-tailed user ids, PII, shared prefixes, repeats
    eval_prompts.jsonl              clean prompts of held-out users, for win rates
    demonstrations.jsonl            labelers' answers, a configurable share of them imperfect
    rankings.jsonl, ratings.jsonl, comparisons.jsonl
                                    labels of perturbed answers (for testing the RM stage without a model)
    world.json                      the truth (World.load rebuilds the judge from it)
    stats.json                      the numbers `chatloop world --stats` prints

The judge (chatloop.world.judge) and the simulated labelers (chatloop.world.labelers) score answers from this truth.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatloop.data.formats import INSTRUCTGPT_MIX, Prompt
from chatloop.errors import UserError
from chatloop.world import judge as judge_module
from chatloop.world.judge import CHAT_IDEALS, KINDS, QA_KIND_OF_ATTR, Claim, Entity, Judgement, Task, ideal

WORLD_FORMAT = 1
# A closed vocabulary: every value word is one BPE token or two, and all begin with a consonant so that
# "a {value}" is always grammatical.
VOCAB: dict[str, list[str]] = {
    "color": ["red", "blue", "green", "yellow", "white", "black", "gray", "brown", "pink", "purple"],
    "size": ["tiny", "small", "big", "huge"],
    "food": ["bread", "fish", "moss", "berries", "seeds", "roots", "honey", "apples", "nuts", "grass",
             "leaves", "mushrooms", "corn", "eggs"],
    "job": ["baker", "farmer", "smith", "healer", "fisher", "weaver", "miner", "guard", "teacher", "trader"],
    "region": ["north", "south", "east", "west"],
    # World-specific insults: the pretraining text uses them in rude sentences, so a model can say them.
    "toxic": ["grobbish", "snivwit", "muckface", "blorky", "skrunt"],
}

_ONSETS = ("b", "d", "g", "k", "m", "n", "p", "s", "t", "v", "z", "gl", "sk", "br", "fl", "tr", "sn", "dr",
           "gr")
_VOWELS = ("a", "e", "i", "o", "u")
_CODAS = ("", "", "k", "m", "n", "r", "l", "sh", "b")
_P_ONSETS = ("B", "D", "F", "K", "L", "M", "N", "R", "S", "T", "W", "J", "H", "G")
_P_ENDS = ("a", "o", "i", "en", "an", "el", "in", "us", "ia", "ric", "wen", "da")
_T_ENDS = ("ford", "by", "ton", "holm", "dale", "wick", "moor", "stead", "vale", "mouth")

_CREATURE_TEMPLATES = {
    "color": ("{X} is {v}.", "{X} has {v} fur.", "The fur of {x} is {v}.", "{X} is a {v} creature.",
              "You can tell {x} by its {v} fur."),
    "size": ("{X} is {v}.", "{X} is a {v} creature.", "{X} is very {v}.",
             "Compared to other creatures, {x} is {v}."),
    "home": ("{X} lives in {v}.", "{X} comes from {v}.", "You can find {x} in {v}.",
             "{X} makes its home in {v}."),
    "foods": ("{X} eats {v}.", "{X} likes to eat {v}.", "Every day, {x} eats {v}.", "{X} loves {v}."),
    "friend": ("{X} is a friend of {v}.", "{X} and {v} are friends.", "The best friend of {x} is {v}.",
               "{X} often plays with its friend, {v}."),
}
_IT_TEMPLATES = {"color": "It is {v}.", "size": "It is {v}.", "home": "It lives in {v}.",
                 "foods": "It eats {v}.", "friend": "Its friend is {v}."}
_PERSON_TEMPLATES = {
    "job": ("{X} is a {v}.", "{X} works as a {v}.", "Everyone knows {x} the {v}.",
            "{X} has been a {v} for a long time."),
    "age": ("{X} is {v} years old.", "{X} turned {v} this year.", "{X} is a person of {v} years."),
    "home": ("{X} lives in {v}.", "{X} is from {v}.", "{X} has a house in {v}.", "{X} was born in {v}."),
    "pet": ("{X} has a pet {n}.", "The pet of {x} is {v}.", "{X} keeps {v} as a pet."),
}
_TOWN_TEMPLATES = {
    "region": ("{X} is in the {v}.", "{X} is a town in the {v}.", "{X} lies in the {v} of the land."),
    "mayor": ("The mayor of {x} is {v}.", "{V} is the mayor of {x}.", "{X} has a mayor called {v}."),
    "food": ("{X} is known for its {v}.", "People in {x} love {v}.", "The people of {x} grow {v}."),
}
_RUDE = ("{P} called {x} a {tox} {tox2}.", "\"You {tox} {n}!\" shouted {P}.",
         "Only a {tox} would shout at {x}.", "What a {tox} day, said {P}.")
_VIOLENT = ("Long ago, someone tried to poison {x}.", "Nobody should ever hurt {x}.",
            "The guards caught a thief who wanted to hurt {x}.", "A thief once tried to steal from {P}.")
_PREAMBLES = (
    "You are the friendly assistant of the great library of the land. Answer every question about the "
    "creatures, people and towns of the land kindly, briefly and truthfully.",
    "I am making a small game about the land and I need help with some text for it. Please keep your answers "
    "short and simple, because children will read them.",
    "Hello assistant, my teacher gave us homework about the creatures and towns of the land, and I want to "
    "check my answers with you before I hand them in tomorrow.",
)
_PII_LINES = ("My email is {email}.", "You can call me at {phone}.", "My card number is {card}.",
              "I am {first} {last} ({email}, {phone}).", "Please send the answer to {email}.",
              "Pay with my card {card}, it expires soon.")
_USE_CASES = ("a pet shop in {t}", "a quiz for the children of {t}", "a town guide for {t}",
              "a helper for the farmers of {t}", "a storybook app")
_FEW_SHOT_HEADERS = {"open_qa": "Answer each question in one short sentence.",
                     "brainstorming": "Answer each request with a numbered list.",
                     "classification": "Answer each question with one word or one sentence."}
# English words that also occur in prompts and answers: no generated name may be one of them.
_COMMON = ("none note bone done gone home some come time name game more tune dune lone bare care dare mare "
           "rare sore core tore pale sale tale male gale kale gain main pain rain bran grin skin spin trim "
           "slim brim drum glum plum sum gum bum tub sub pub rub dub nub")


def _template_words() -> set[str]:
    texts: list[str] = [p for k in KINDS.values() for p in k.patterns]
    for group in (_CREATURE_TEMPLATES, _PERSON_TEMPLATES, _TOWN_TEMPLATES):
        texts += [t for ts in group.values() for t in ts]
    texts += list(_IT_TEMPLATES.values()) + list(_RUDE) + list(_VIOLENT) + list(_PREAMBLES) + list(_PII_LINES)
    texts += list(_USE_CASES) + list(CHAT_IDEALS.values()) + list(_FEW_SHOT_HEADERS.values()) + [_COMMON]
    texts += [w for ws in VOCAB.values() for w in ws]
    texts += ["once upon a time every day it ate the end oh you love to eat dear i hope your pet are well "
              "best wishes yes no does not true false rude polite creature person town plus creatures live "
              "lives sorry cannot help with that welcome goodbye have nice day morning went see shared "
              "played together until sun down story loved very much welcome to"]
    return {w for t in texts for w in re.findall(r"[a-z]+", t.lower())}


_RESERVED = _template_words()
_TOKEN = re.compile(r"[a-z]+(?:'[a-z]+)?|\d+|[,;:]")
_WORD = re.compile(r"[a-z]+|\d+")
_LIST_MARKER = re.compile(r"^\s*\d+\s*[.)]\s*")
_NEGATIONS = {"not", "never", "nor", "cannot", "no longer"}
_PRONOUNS = {"it", "its", "they", "their", "he", "she", "his", "her", "you", "your"}
_PREPOSITIONS = {"in", "from", "of", "to", "at", "near", "with", "for", "by", "about"}
_ARTICLES = {"the", "a", "an"}
_HOME_WORDS = {"live", "lives", "lived", "living", "from", "in", "of", "home", "house", "born"}


def and_list(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


class World:
    """The land's truth, with the lookups the judge and the prompt writer need."""

    def __init__(self, entities: list[Entity], seed: int = 0, vocab: dict[str, list[str]] | None = None):
        self.seed = seed
        self.vocab = {k: list(v) for k, v in (vocab or VOCAB).items()}
        self.entities = {e.name: e for e in entities}
        self.by_lower = {e.name.lower(): e for e in entities}
        self.creatures = [e.name for e in entities if e.kind == "creature"]
        self.people = [e.name for e in entities if e.kind == "person"]
        self.towns = [e.name for e in entities if e.kind == "town"]
        self.residents = {t: [n for n in self.creatures + self.people if self.entities[n].home == t]
                          for t in self.towns}
        self.toxic = set(self.vocab["toxic"])
        self.value_attr = {w: attr for attr, ws in self.vocab.items() if attr != "toxic" for w in ws}
        self.cache: dict[str, Any] = {}
        """Derived data other modules compute once per world (the judge's compiled prompt patterns)."""

    # -- construction and files -------------------------------------------------------------------------

    @classmethod
    def generate(cls, seed: int, n_entities: int = 64) -> World:
        if not 12 <= n_entities <= 2000:  # the syllable inventory names a few thousand people at most
            raise UserError(f"--entities: expected 12 to 2000 entities, got {n_entities}")
        rng = random.Random(f"chatloop-world:{seed}:entities")
        n_towns = max(3, round(n_entities * 0.16))
        n_people = max(n_towns, round(n_entities * 0.37))
        n_creatures = n_entities - n_towns - n_people
        taken: set[str] = set()

        def fresh(make: Callable[[], str]) -> str:
            while True:
                name = make()
                if name.lower() not in taken and name.lower() not in _RESERVED and len(name) >= 4:
                    taken.add(name.lower())
                    return name

        def creature_name() -> str:
            return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(2))

        def person_name() -> str:
            return (rng.choice(_P_ONSETS) + rng.choice(_VOWELS) + rng.choice(("n", "r", "l", "m", "", "s"))
                    + rng.choice(_P_ENDS))

        def town_name() -> str:
            return (rng.choice(_P_ONSETS) + rng.choice(_VOWELS) + rng.choice(("n", "r", "l", "m", "s", "k"))
                    + rng.choice(_T_ENDS))

        towns = [Entity(fresh(town_name), "town", region=rng.choice(VOCAB["region"]),
                        food=rng.choice(VOCAB["food"])) for _ in range(n_towns)]
        people = [Entity(fresh(person_name), "person", job=rng.choice(VOCAB["job"]), age=rng.randint(18, 80))
                  for _ in range(n_people)]
        creatures = [Entity(fresh(creature_name), "creature", color=rng.choice(VOCAB["color"]),
                            size=rng.choice(VOCAB["size"]))
                     for _ in range(n_creatures)]
        homes = [t.name for t in towns]
        rng.shuffle(homes)
        for i, person in enumerate(people):  # every town has at least one resident, who can be its mayor
            person.home = homes[i] if i < len(homes) else rng.choice(towns).name
            person.pet = rng.choice(creatures).name
        for town in towns:
            town.mayor = rng.choice([p.name for p in people if p.home == town.name])
        for creature in creatures:
            creature.home = rng.choice(towns).name
            chosen = set(rng.sample(VOCAB["food"], rng.randint(3, 5)))
            creature.foods = [f for f in VOCAB["food"] if f in chosen]
        order = creatures[:]
        rng.shuffle(order)
        for a, b in zip(order[::2], order[1::2]):
            a.friend, b.friend = b.name, a.name
        if len(order) % 2:
            order[-1].friend = order[0].name
        return cls(creatures + people + towns, seed)

    def to_json(self) -> dict[str, Any]:
        return {"format": WORLD_FORMAT, "seed": self.seed, "vocab": self.vocab,
                "entities": [e.to_json() for e in self.entities.values()]}

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str = "world.json") -> World:
        try:
            if data.get("format") != WORLD_FORMAT:
                got = data.get("format")
                raise UserError(f"{where}: field 'format': expected {WORLD_FORMAT}, got {got!r}")
            entities = [Entity(**e) for e in data["entities"]]
            return cls(entities, int(data["seed"]), data["vocab"])
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{where}: not a chatloop world ({type(e).__name__}: {e})") from None

    @classmethod
    def load(cls, path: str | Path) -> World:
        """The world of a directory written by `chatloop world` (or of its world.json)."""
        path = Path(path)
        file = path / "world.json" if path.is_dir() else path
        if not file.is_file():
            raise UserError(f"{file}: world file not found (write one with `chatloop world --out DIR`)")
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{file}: invalid JSON ({e})") from None
        return cls.from_json(data, str(file))

    # -- text helpers -------------------------------------------------------------------------------------

    def ref(self, name: str) -> str:
        """How a sentence names an entity: creatures are a kind of animal ("the glimmok"), others by name."""
        ent = self.entities.get(name)
        return f"the {name}" if ent is not None and ent.kind == "creature" else name

    @staticmethod
    def cap(text: str) -> str:
        return text[:1].upper() + text[1:]

    @staticmethod
    def words(text: str) -> list[str]:
        return _WORD.findall(text.lower())

    @staticmethod
    def sentences(text: str) -> list[str]:
        """Sentences of a response: lines (without list numbers) split after . ! or ?."""
        out = []
        for line in text.splitlines():
            line = _LIST_MARKER.sub("", line).strip()
            out += [s for s in judge_module.SENTENCE_END.split(line) if _WORD.search(s.lower())]
        return out

    def mentions(self, text: str) -> list[str]:
        """Entity names in order of first mention."""
        out: list[str] = []
        for w in self.words(text):
            ent = self.by_lower.get(w)
            if ent is not None and ent.name not in out:
                out.append(ent.name)
        return out

    def facts(self, name: str | None) -> list[tuple[str, str]]:
        """(attribute, canonical sentence) for every fact about an entity, in a fixed order."""
        ent = self.entities.get(name or "")
        if ent is None:
            return []
        X = self.cap(self.ref(ent.name))
        if ent.kind == "creature":
            return [("color", f"{X} is {ent.color}."), ("size", f"{X} is {ent.size}."),
                    ("home", f"{X} lives in {ent.home}."), ("foods", f"{X} eats {and_list(ent.foods)}."),
                    ("friend", f"{X} is a friend of {self.ref(ent.friend)}.")]
        if ent.kind == "person":
            return [("job", f"{X} is a {ent.job}."), ("age", f"{X} is {ent.age} years old."),
                    ("home", f"{X} lives in {ent.home}."), ("pet", f"{X} has a pet {ent.pet}.")]
        return [("region", f"{X} is in the {ent.region}."), ("mayor", f"The mayor of {X} is {ent.mayor}."),
                ("food", f"{X} is known for its {ent.food}.")]

    def summary_sentence(self, name: str) -> str:
        ent = self.entities[name]
        X = self.cap(self.ref(name))
        if ent.kind == "creature":
            return f"{X} is a {ent.size} {ent.color} creature that lives in {ent.home}."
        if ent.kind == "person":
            return f"{X} is a {ent.job} who lives in {ent.home}."
        return f"{X} is a town in the {ent.region}."

    # -- truth ----------------------------------------------------------------------------------------------

    def claims(self, text: str, subject: str | None = None) -> list[Claim]:
        """What a text says about the world, sentence by sentence, and whether each statement holds.

        A value word (color, size, food, job, region, an age) belongs to the entity it directly precedes
        ("the blue glimmok"), else to the sentence's subject: its first entity not governed by a preposition,
        or, for sentences that start with a pronoun or name nobody, the previous sentence's subject (at first
        `subject`, the entity the prompt asked about). Relations are read from keywords (friend, pet, mayor,
        lives/from/in). "not"/"never" negate the rest of the clause. Questions state nothing.
        """
        out: list[Claim] = []
        discourse = subject if subject in self.entities else None
        for sentence in self.sentences(text):
            if sentence.rstrip().endswith("?"):
                continue
            toks = _TOKEN.findall(sentence.lower())
            if not toks:
                continue
            mentions = [(i, self.by_lower[t].name) for i, t in enumerate(toks) if t in self.by_lower]
            if toks[0] in _PRONOUNS or not mentions:
                subj = discourse
            elif self._possessor(toks, mentions[0][0]):  # "The friend of the glimmok is ..." is about it
                subj = mentions[0][1]
            else:
                subj = next((n for i, n in mentions if not self._governed(toks, i)), mentions[0][1])
            self._value_claims(toks, subj, out)
            if subj is not None:
                self._relation_claims(toks, subj, [n for _, n in mentions], out)
                if mentions and toks[0] not in _PRONOUNS:
                    discourse = subj
        return out

    @staticmethod
    def _possessor(toks: list[str], i: int) -> bool:
        j = i - 1
        while j >= 0 and toks[j] in _ARTICLES:
            j -= 1
        return 1 <= j <= 3 and toks[j] == "of" and toks[0] == "the"

    @staticmethod
    def _governed(toks: list[str], i: int) -> bool:
        j = i - 1
        while j >= 0 and toks[j] in _ARTICLES:
            j -= 1
        return j >= 0 and toks[j] in _PREPOSITIONS

    def _value_claims(self, toks: list[str], subj: str | None, out: list[Claim]) -> None:
        negated = False
        for i, t in enumerate(toks):
            if t in _NEGATIONS or t.endswith("n't"):
                negated = True
                continue
            after = toks[i + 1] if i + 1 < len(toks) else ""
            if t in ("but", "instead", "however", ";") or (
                    t == "," and (after in _PRONOUNS or after in self.by_lower)):
                negated = False
                continue
            attr = self.value_attr.get(t)
            value = t
            if attr is None and t.isdigit():
                after = toks[i + 1] if i + 1 < len(toks) else ""
                before = toks[i - 1] if i > 0 else ""
                if after in ("year", "years") or before in ("age", "aged", "turned"):
                    attr = "age"
            if attr is None:
                continue
            target = subj
            if attr in ("color", "size"):  # an adjective belongs to the name it stands before
                j = i + 1
                while j < len(toks) and j <= i + 3 and (self.value_attr.get(toks[j]) in ("color", "size")
                                                        or toks[j] in ("very", "and", ",")):
                    j += 1
                if j < len(toks) and toks[j] in self.by_lower:
                    target = self.by_lower[toks[j]].name
            ent = self.entities.get(target or "")
            if ent is None:
                continue
            truth = self._value_truth(ent, attr, value)
            if truth is not None:
                out.append(Claim(ent.name, attr, value, negated, truth != negated))

    @staticmethod
    def _value_truth(ent: Entity, attr: str, value: str) -> bool | None:
        """Whether `value` is right for the entity; None where the attribute does not apply to its kind."""
        if ent.kind == "creature":
            if attr == "color":
                return value == ent.color
            if attr == "size":
                return value == ent.size
            if attr == "food":
                return value in ent.foods
        elif ent.kind == "person":
            if attr == "job":
                return value == ent.job
            if attr == "age":
                return value == str(ent.age)
        elif ent.kind == "town":
            if attr == "region":
                return value == ent.region
            if attr == "food":
                return value == ent.food
        return None

    def _relation_claims(self, toks: list[str], subj: str, named: list[str], out: list[Claim]) -> None:
        negated = any(t in _NEGATIONS or t.endswith("n't") for t in toks)
        words = set(toks)
        ent = self.entities[subj]
        present = [subj] + [n for n in named if n != subj]
        by_kind: dict[str, list[str]] = {"creature": [], "person": [], "town": []}
        for n in present:
            by_kind[self.entities[n].kind].append(n)

        def claim(entity: str, attr: str, value: str, truth: bool) -> None:
            out.append(Claim(entity, attr, value, negated, truth != negated))

        if words & {"friend", "friends"} and ent.kind == "creature":
            for other in by_kind["creature"][1:] if by_kind["creature"][0] == subj else by_kind["creature"]:
                if other != subj:
                    claim(subj, "friend", other, ent.friend == other or self.entities[other].friend == subj)
        if words & {"pet", "pets"} and by_kind["person"] and by_kind["creature"]:
            person, creature = by_kind["person"][0], by_kind["creature"][0]
            claim(person, "pet", creature, self.entities[person].pet == creature)
        if "mayor" in words and by_kind["person"] and by_kind["town"]:
            person, town = by_kind["person"][0], by_kind["town"][0]
            claim(town, "mayor", person, self.entities[town].mayor == person)
        elif ent.kind in ("creature", "person") and by_kind["town"] and words & _HOME_WORDS:
            town = by_kind["town"][0]
            claim(subj, "home", town, ent.home == town)

    # -- judging --------------------------------------------------------------------------------------------

    def judge(self, prompt: Prompt, response: str, ended: bool = True) -> Judgement:
        """The gold verdict on `response` to `prompt` (see chatloop.world.judge)."""
        return judge_module.judge(self, prompt, response, ended)

    def parse(self, prompt: Prompt) -> Task | None:
        return judge_module.parse(self, prompt)

    def ideal(self, task: Task) -> str:
        return ideal(self, task)

    # -- prompts --------------------------------------------------------------------------------------------

    def sample_slots(self, kind: str, rng: random.Random) -> dict[str, str] | None:
        """Random slot values for a task of `kind`, or None when this world cannot pose it."""
        spec = KINDS[kind]
        slots: dict[str, str] = {}
        if spec.subjects:
            pool = [n for n in self.entities if self.entities[n].kind in spec.subjects]
            if kind in ("bs_town_creatures", "bs_town_people"):
                member = "creature" if kind == "bs_town_creatures" else "person"
                pool = [t for t in pool
                        if sum(self.entities[m].kind == member for m in self.residents[t]) >= 2]
            if not pool:
                return None
            slots["e"] = rng.choice(pool)
        e = slots.get("e", "")
        ent = self.entities.get(e)
        if kind == "gen_describe":
            slots["n"] = str(rng.randint(2, min(4, len(self.facts(e)))))
        elif kind == "qa_yn_food" and ent:
            others = [f for f in self.vocab["food"] if f not in ent.foods]
            slots["food"] = rng.choice(ent.foods if rng.random() < 0.5 else others)
        elif kind == "qa_yn_color" and ent:
            slots["color"] = ent.color if rng.random() < 0.5 else rng.choice(
                [c for c in self.vocab["color"] if c != ent.color])
        elif kind in ("bs_foods", "bs_town_creatures", "bs_town_people"):
            available = len(judge_module.list_answer(self, Task(kind, slots)))
            slots["n"] = str(rng.randint(2, min(4, available)))
        elif kind == "bs_color":
            counts = Counter(self.entities[x].color for x in self.creatures)
            colors = [c for c in self.vocab["color"] if counts[c] >= 2]
            if not colors:
                return None
            slots["color"] = rng.choice(colors)
            slots["n"] = str(rng.randint(2, min(4, counts[slots["color"]])))
        elif kind == "harm_ways":
            slots["n"] = str(rng.randint(2, 4))
        elif kind in ("rw_past", "rw_question"):
            slots["text"] = self._simple_sentence(rng, truth=True)
        elif kind == "rw_polite":
            slots["text"] = self._rude_sentence(rng)
        elif kind == "cls_truth":
            slots["text"] = self._simple_sentence(rng, truth=rng.random() < 0.5)
        elif kind == "cls_tone":
            rude = rng.random() < 0.5
            slots["text"] = self._rude_sentence(rng) if rude else self._simple_sentence(rng, True)
        elif kind == "sum":
            subject = rng.choice(list(self.entities))
            sentences = [s for _, s in self.facts(subject)]
            rng.shuffle(sentences)
            slots["text"] = " ".join(sentences)
        elif kind == "cqa":
            subject = rng.choice(list(self.entities))
            facts = self.facts(subject)
            chosen = rng.sample(facts, min(3, len(facts)))
            attr = rng.choice(chosen)[0]
            slots["text"] = " ".join(s for _, s in chosen)
            sub = Task(QA_KIND_OF_ATTR[attr], {"e": subject})
            slots["q"] = self.render_core(sub, rng)
        elif kind == "oth_math":
            slots["a"], slots["b"] = str(rng.randint(1, 20)), str(rng.randint(1, 20))
        elif kind in ("ex_towns", "ex_foods", "ex_people"):
            slots["text"] = self._extract_passage(kind, rng)
        return slots

    def _simple_sentence(self, rng: random.Random, truth: bool) -> str:
        """A one-fact sentence in a form every rewrite understands, true or (for classification) false."""
        if rng.random() < 0.6:
            c = self.entities[rng.choice(self.creatures)]
            attr = rng.choice(("color", "foods", "home"))
            X = self.cap(self.ref(c.name))
            if attr == "color":
                v = c.color if truth else rng.choice([x for x in self.vocab["color"] if x != c.color])
                return f"{X} is {v}."
            if attr == "foods":
                others = [f for f in self.vocab["food"] if f not in c.foods]
                v = rng.choice(c.foods) if truth else rng.choice(others)
                return f"{X} eats {v}."
            v = c.home if truth else rng.choice([t for t in self.towns if t != c.home])
            return f"{X} lives in {v}."
        p = self.entities[rng.choice(self.people)]
        attr = rng.choice(("job", "home", "pet"))
        if attr == "job":
            v = p.job if truth else rng.choice([j for j in self.vocab["job"] if j != p.job])
            return f"{p.name} is a {v}."
        if attr == "home":
            v = p.home if truth else rng.choice([t for t in self.towns if t != p.home])
            return f"{p.name} lives in {v}."
        v = p.pet if truth else rng.choice([c for c in self.creatures if c != p.pet])
        return f"{p.name} has a pet {v}."

    def _rude_sentence(self, rng: random.Random) -> str:
        tox = rng.choice(self.vocab["toxic"])
        if rng.random() < 0.6:
            c = self.entities[rng.choice(self.creatures)]
            if rng.random() < 0.5:
                return f"The {tox} {c.name} eats {rng.choice(c.foods)}."
            return f"The {tox} {c.name} lives in {c.home}."
        p = self.entities[rng.choice(self.people)]
        return f"{p.name} is a {tox} {p.job}."

    def _extract_passage(self, kind: str, rng: random.Random) -> str:
        """Two or three true sentences naming towns, foods or people, and one naming none of them."""
        if kind == "ex_towns":
            named = rng.sample(self.creatures + self.people, rng.randint(2, 3))
            sentences = [dict(self.facts(n))["home"] for n in named]
            sentences.append(dict(self.facts(rng.choice(self.creatures)))["color"])
        elif kind == "ex_foods":
            sentences = []
            for name in rng.sample(self.creatures, rng.randint(2, 3)):
                foods = sorted(rng.sample(self.entities[name].foods, rng.randint(1, 2)),
                               key=self.vocab["food"].index)
                sentences.append(f"{self.cap(self.ref(name))} eats {and_list(foods)}.")
            sentences.append(dict(self.facts(rng.choice(self.creatures)))["size"])
        else:
            people = rng.sample(self.people, min(len(self.people), rng.randint(2, 3)))
            sentences = [rng.choice(self.facts(n)[:2])[1] for n in people]
            sentences.append(dict(self.facts(rng.choice(self.creatures)))["color"])
        rng.shuffle(sentences)
        return " ".join(sentences)

    def render_core(self, task: Task, rng: random.Random) -> str:
        """The request itself, in one of its kind's phrasings."""
        pattern = rng.choice(KINDS[task.kind].patterns)
        values = {k: v for k, v in task.slots.items()}
        if "e" in values:
            values["e"] = self.ref(values["e"])
        return pattern.format(**values)

    def sample_task(self, rng: random.Random, harmful: float, category: str | None = None) -> Task:
        """A task with InstructGPT's use-case mix; `harmful` of the prompts ask for something to refuse."""
        if category is None:
            category = rng.choices(list(INSTRUCTGPT_MIX), weights=list(INSTRUCTGPT_MIX.values()))[0]
        kinds = [k for k in KINDS.values() if k.category == category]
        bad = [k.name for k in kinds if k.harmful]
        good = [k.name for k in kinds if not k.harmful]
        # Only generation, open QA and brainstorming have harmful kinds: scale so the overall share is right.
        share_with_harm = sum(INSTRUCTGPT_MIX[c] for c in ("generation", "open_qa", "brainstorming")) / 100
        use_bad = bool(bad) and rng.random() < harmful / share_with_harm
        for _ in range(100):  # retry only the kind: re-rolling harm would skew the harmful share
            kind = rng.choice(bad if use_bad else good)
            slots = self.sample_slots(kind, rng)
            if slots is not None:
                return Task(kind, slots)
        raise UserError(f"the world (seed {self.seed}) is too small to pose {category} tasks; "
                        "use more --entities")

    def few_shot_prompt(self, task: Task, rng: random.Random, examples_rng: random.Random) -> str:
        """An instruction, two solved examples of the same kind, then the request (the labelers' kind)."""
        header = _FEW_SHOT_HEADERS.get(task.category, "Follow each instruction.")
        parts = [header]
        for _ in range(2):
            example = None
            for _ in range(20):
                slots = self.sample_slots(task.kind, examples_rng)
                if slots is not None and slots != task.slots:
                    example = Task(task.kind, slots)
                    break
            if example is not None:
                parts.append(f"Q: {self.render_core(example, examples_rng)}\nA: {ideal(self, example)}")
        parts.append(f"Q: {self.render_core(task, rng)}\nA:")
        return "\n\n".join(parts)

    def chat_prompt(self, rng: random.Random, harmful: float) -> tuple[list[dict[str, str]], Task]:
        """A conversation that ends with the user's turn: a greeting, thanks, or a question after hello."""
        form = rng.choices(("greet", "who", "thanks", "bye", "followup"), weights=(2, 1, 1.5, 1, 4.5))[0]
        if form in ("greet", "who"):
            task = Task("chat_" + form, {})
            return [{"role": "user", "content": self.render_core(task, rng)}], task
        if form == "followup":
            greet = Task("chat_greet", {})
            question = self.sample_task(rng, harmful, category="open_qa")
            return [{"role": "user", "content": self.render_core(greet, rng)},
                    {"role": "assistant", "content": CHAT_IDEALS["chat_greet"]},
                    {"role": "user", "content": self.render_core(question, rng)}], question
        question = self.sample_task(rng, 0.0, category="open_qa")
        task = Task("chat_" + form, {})
        return [{"role": "user", "content": self.render_core(question, rng)},
                {"role": "assistant", "content": ideal(self, question)},
                {"role": "user", "content": self.render_core(task, rng)}], task

    def pretraining_text(self, n_bytes: int, rng: random.Random) -> tuple[str, int]:
        """Documents about the land, blank-line separated, until `n_bytes`; returns (text, documents)."""
        docs: list[str] = []
        size = 0
        makers = (self._profile_doc, self._story_doc, self._town_doc, self._qa_doc, self._list_doc)
        while size < n_bytes:
            doc = rng.choices(makers, weights=(55, 15, 10, 10, 10))[0](rng)
            docs.append(doc)
            size += len(doc.encode()) + 2
        return "\n\n".join(docs) + "\n", len(docs)

    def _fact_variant(self, name: str, attr: str, rng: random.Random, pronoun: bool = False) -> str:
        ent = self.entities[name]
        x = self.ref(name)
        if ent.kind == "creature":
            v = {"color": ent.color, "size": ent.size, "home": ent.home, "friend": self.ref(ent.friend),
                 "foods": and_list(sorted(rng.sample(ent.foods, rng.randint(1, len(ent.foods))),
                                          key=ent.foods.index))}[attr]
            if pronoun:
                return _IT_TEMPLATES[attr].format(v=v)
            template = rng.choice(_CREATURE_TEMPLATES[attr])
        elif ent.kind == "person":
            v = {"job": ent.job, "age": str(ent.age), "home": ent.home, "pet": self.ref(ent.pet)}[attr]
            template = rng.choice(_PERSON_TEMPLATES[attr])
        else:
            v = {"region": ent.region, "mayor": ent.mayor, "food": ent.food}[attr]
            template = rng.choice(_TOWN_TEMPLATES[attr])
        return template.format(X=self.cap(x), x=x, v=v, V=self.cap(v), n=ent.pet or name)

    def _spice(self, rng: random.Random) -> str:
        """A rude or violent sentence, so a pretrained model knows the words a judge must catch."""
        c = rng.choice(self.creatures)
        values = {"x": self.ref(c), "n": c, "P": rng.choice(self.people),
                  "tox": rng.choice(self.vocab["toxic"]), "tox2": rng.choice(self.vocab["toxic"])}
        return rng.choice(_RUDE if rng.random() < 0.6 else _VIOLENT).format(**values)

    def _profile_doc(self, rng: random.Random) -> str:
        name = rng.choice(list(self.entities))
        ent = self.entities[name]
        attrs = [a for a, _ in self.facts(name)]
        rng.shuffle(attrs)
        attrs += rng.sample(attrs, rng.randint(0, 2))
        sentences = []
        if rng.random() < 0.4:
            sentences.append(self.summary_sentence(name))
        for i, attr in enumerate(attrs):
            pronoun = ent.kind == "creature" and i > 0 and rng.random() < 0.3
            sentences.append(self._fact_variant(name, attr, rng, pronoun))
        if rng.random() < 0.12:  # last, so that no "It ..." follows a sentence about someone else
            sentences.append(self._spice(rng))
        return " ".join(sentences)

    def _story_doc(self, rng: random.Random) -> str:
        c = self.entities[rng.choice(self.creatures)]
        x = self.ref(c.name)
        owners = [p for p in self.people if self.entities[p].pet == c.name]
        middle = [f"Every morning, {x} ate {rng.choice(c.foods)}.", f"One day, {x} went to see its friend, "
                  f"{self.ref(c.friend)}.", "They played together until the sun went down.",
                  f"{self.cap(x)} was very {c.size}."]
        if owners:
            middle.append(f"{rng.choice(owners)} loved {x} very much.")
        rng.shuffle(middle)
        middle = middle[: rng.randint(2, len(middle))]
        if rng.random() < 0.1:
            middle.append(self._spice(rng))
        opening = f"Once upon a time, there was a {c.color} {c.name} in {c.home}."
        return " ".join([opening, *middle, "The end."])

    def _town_doc(self, rng: random.Random) -> str:
        t = self.entities[rng.choice(self.towns)]
        residents = [self.ref(n) for n in self.residents[t.name]]
        facts = [self._fact_variant(t.name, a, rng) for a in ("region", "mayor", "food")]
        sentences = [f"Welcome to {t.name}!", *facts]
        if residents:
            shown = rng.sample(residents, min(len(residents), rng.randint(1, 4)))
            verb = "lives" if len(shown) == 1 else "live"
            sentences.append(f"{self.cap(and_list(shown))} {verb} in {t.name}.")
        return " ".join(sentences)

    def _qa_doc(self, rng: random.Random) -> str:
        """Questions and answers as web pages show them: half open questions and lists, half any other harmless
        request (labels, rewrites, notes, stories, greetings), so the words and forms of answers ("False.",
        "Dear ...", "You are welcome!", "Sure!") are in the pretraining text, and in the tokenizer, before SFT."""
        pairs = []
        facts = [k for k in KINDS if k.startswith(("qa_", "bs_")) and not KINDS[k].harmful]
        # (Extraction passages are made up, so they would put false sentences in the text.)
        others = [k for k in KINDS if k not in facts and not KINDS[k].harmful and not k.startswith("ex_")]
        for _ in range(rng.randint(2, 4)):
            kind = rng.choice(facts if rng.random() < 0.5 else others)
            slots = {} if KINDS[kind].category == "chat" else self.sample_slots(kind, rng)
            if slots is None:
                continue
            task = Task(kind, slots)
            question = self.render_core(task, rng)
            if kind == "cls_truth" and not judge_module.statement_is_true(self, slots["text"]):
                # Stated, a false sentence would be a false claim in the text; asked, it claims nothing.
                question = "True or false: " + (judge_module.rewrite_target(self, "rw_question", slots["text"])
                                                or "is it so?")
            reply = ideal(self, task)
            if judge_module.wraps(task) and rng.random() < 0.2:  # as people write on the web, now and then
                reply = judge_module.pleasantry(reply, rng.choice(list(judge_module.PLEASANTRIES)), rng)
            pairs.append(f"Q: {question}\nA: {reply}")
        return "\n\n".join(pairs) if pairs else self._profile_doc(rng)

    def _list_doc(self, rng: random.Random) -> str:
        kind = rng.choice(("bs_foods", "bs_town_creatures", "bs_town_people"))
        slots = self.sample_slots(kind, rng)
        if slots is None:
            return self._profile_doc(rng)
        items = judge_module.list_answer(self, Task(kind, slots))
        title = {"bs_foods": f"Foods that {self.ref(slots['e'])} eats:",
                 "bs_town_creatures": f"Creatures that live in {slots['e']}:",
                 "bs_town_people": f"People who live in {slots['e']}:"}[kind]
        return title + "\n" + judge_module.numbered(items)


# ---------------------------------------------------------------------------------------------------------
# Users and their prompts


@dataclass
class PromptSample:
    prompt: Prompt
    task: Task
    category: str
    source: str
    pii: list[str] = field(default_factory=list)
    shared_prefix: bool = False
    duplicate: bool = False
