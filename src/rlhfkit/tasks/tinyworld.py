"""TinyWorld: a small procedurally generated world of instructions, with a gold judge.

The project's offline test bed. The language is tiny and regular (a few hundred words, every sentence
from a fixed set of templates) so that a ~1M-parameter model learns it in a minute of CPU training, while
the gold judge checks several independent criteria per answer, leaving room between imitation (SFT on
imperfect demonstrations) and the optimum.

The world
---------
27 animals, each with a class (mammal, bird, fish, amphibian, reptile, insect), a home, a food and a
colour; fruits, vegetables and colours; ten character names; ten natural phenomena with child-level
explanations.

Instruction types (prompts are 3-14 words, ideal answers 4-39 words)
--------------------------------------------------------------------
``story``     "Write a story about otters."  Ideal: four sentences about one named animal, stating its true
              home and food, then "The end."
``list``      "List three fruits."  Ideal: "Here are three fruits: apple, pear and plum."
``explain``   "Explain rain to a 6-year-old."  Ideal: two to four short sentences in simple words that state
              the key ideas (rain: water, clouds, drops, falling).
``question``  "Is a whale a fish? Answer yes or no and say why."  Ideal: "No. A whale is not a fish. It is a
              mammal."

The gold judge
--------------
Every criterion and gate is a number in [0, 1] (see :meth:`TinyWorld.gold_details`) and

    gold_score = words * grammar * form * length * prod over criteria of (1 - severity * (1 - criterion))

so each failed criterion costs a fixed fraction of the score (its severity, in :data:`SEVERITY`) and the
failures compound. The four gates, shared by all types, make garbage score near 0:

* ``words``: fraction of whitespace tokens that are words of the world's vocabulary;
* ``grammar``: fraction of adjacent word pairs, within a sentence, licensed by the world's templates (any
  template with any filler of its slots), so word salad of real words scores low;
* ``form``: fraction of sentences that start with a capital, end with ".", "!" or "?", have at most 20
  tokens and no word twice in a row;
* ``length``: 1 inside the type's ideal word range (:data:`LENGTHS`), ``n / low`` below it and
  ``1 - (n - high) / high`` above it (0 at twice the upper bound): longer than ideal is penalised.

The criteria (``repetition`` = distinct sentences / sentences and ``topic`` = the animal, category or
phenomenon is named, for every type):

* story: ``topic``, ``ending`` (the last sentence is "The end."), ``sentences`` (3-5 before the ending,
  -0.25 per sentence outside), ``facts`` (of the homes and foods named, the fraction true of the subject;
  0.5 when none is named), ``repetition``;
* list: ``topic``, ``count`` (-0.5 per distinct item too many or too few), ``category`` (fraction of the
  distinct items in the category), ``duplicates`` (-0.5 per repeated item), ``repetition``;
* explain: ``topic``, ``key_facts`` (two of the phenomenon's key ideas, 0.5 each), ``simple_words`` (-0.5 per
  word of nine letters or more), ``sentences`` (2-4, -0.25 per sentence outside), ``repetition``;
* question: ``answer`` (the first word is the right "Yes"/"No"), ``reason`` (the true class/home/food is
  stated and not negated; 0.5 when a third, false value is also named), ``topic``, ``repetition``.

Simulated labelers
------------------
Demonstrations come from five labelers (:data:`LABELERS`, skill 0.25-0.9). A labeler writes an ideal answer
(wording, names and items vary) with probability ``skill``; otherwise one of the type's typical mistakes
(missing ending, repeated sentence, wrong fact, off-topic, wrong count, off-category or duplicate item,
hard words, no reason, wrong answer, padding with chatter, too short), and each further mistake with
probability ``1 - skill``. Their mean gold score is about 0.68 (references: 1.0).

Rankings (:meth:`Task.rank`) are Plackett-Luce draws with temperature 0.5 from a utility that is the gold
score plus a length bias the gold judge does not share: ``labeler_bias * min(words, 60) / 60`` (default
``labeler_bias`` 0.3). The labeler agrees with gold on about 73% of pairs of demonstrations and mildly
prefers longer answers, so a reward model can learn to like length and a policy optimised hard against it
drifts past the ideal length, where the gold judge penalises it. Two such labelers agree with each other on
about 61% of those pairs (60% on pairs of the demo's SFT samples): noisier than InstructGPT's labelers,
who agree with each other on 72.6% (a temperature of 0.25 would match them; see docs/tasks.md).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import lru_cache
from itertools import pairwise

from rlhfkit.tasks.base import Task, stable_hash

# --------------------------------------------------------------------------------------------- the world


@dataclass(frozen=True)
class Animal:
    name: str
    plural: str
    kind: str  # its class: mammal, bird, ...
    home: str  # a key of HOMES
    food: str
    colour: str


ANIMALS: tuple[Animal, ...] = tuple(
    Animal(*row.split())
    for row in (
        "otter otters mammal river fish brown",
        "fox foxes mammal forest mice red",
        "whale whales mammal sea fish grey",
        "dolphin dolphins mammal sea fish grey",
        "bat bats mammal cave bugs black",
        "rabbit rabbits mammal field carrots white",
        "cow cows mammal farm grass brown",
        "horse horses mammal farm hay brown",
        "bear bears mammal forest berries brown",
        "goat goats mammal hills grass white",
        "owl owls bird forest mice brown",
        "duck ducks bird pond seeds white",
        "penguin penguins bird ice fish black",
        "parrot parrots bird jungle nuts green",
        "hen hens bird farm seeds brown",
        "eagle eagles bird hills mice brown",
        "shark sharks fish sea fish grey",
        "salmon salmon fish river bugs pink",
        "frog frogs amphibian pond bugs green",
        "snake snakes reptile desert mice yellow",
        "turtle turtles reptile sea plants green",
        "lizard lizards reptile desert bugs green",
        "bee bees insect garden flowers yellow",
        "ant ants insect garden leaves black",
        "butterfly butterflies insect garden flowers blue",
        "beetle beetles insect forest leaves black",
        "moth moths insect forest leaves grey",
    )
)
ANIMAL = {a.name: a for a in ANIMALS}

#: Home noun -> the phrase used after "lives".
HOMES = {
    "river": "by the river",
    "forest": "in the forest",
    "sea": "in the sea",
    "cave": "in a cave",
    "field": "in the field",
    "farm": "on the farm",
    "hills": "in the hills",
    "pond": "in the pond",
    "ice": "on the ice",
    "jungle": "in the jungle",
    "desert": "in the desert",
    "garden": "in the garden",
}
FOODS = ("fish", "mice", "bugs", "carrots", "grass", "hay", "berries", "seeds", "nuts", "plants", "leaves",
         "flowers")
CLASSES = {"mammal": "mammals", "bird": "birds", "fish": "fish", "amphibian": "amphibians",
           "reptile": "reptiles", "insect": "insects"}
#: The wrong class asked about in "Is a X a Y?" where there is a classic confusion.
CLASSIC_CONFUSION = {"whale": "fish", "dolphin": "fish", "bat": "bird", "penguin": "fish", "frog": "reptile",
                     "turtle": "fish", "salmon": "reptile"}
COLOURS = ("red", "blue", "green", "yellow", "pink", "purple", "white", "black", "grey", "brown")
NAMES = ("Tom", "Sam", "Ben", "Max", "Leo", "Lily", "Mia", "Ann", "Zoe", "Ivy")
#: Number words; prompts ask for two to four items.
COUNT_WORDS = {2: "two", 3: "three", 4: "four", 5: "five"}
LIST_COUNTS = (2, 3, 4)

_FRUITS = "apple apples pear pears plum plums banana bananas cherry cherries grape grapes lemon lemons " \
          "mango mangoes peach peaches"
_VEGETABLES = "carrot carrots pea peas bean beans potato potatoes onion onions leek leeks corn corn " \
              "cabbage cabbages"


def _pairs(words: str) -> dict[str, str]:
    w = words.split()
    return dict(zip(w[::2], w[1::2], strict=True))


#: Category -> {singular item: plural item}.
CATEGORIES: dict[str, dict[str, str]] = {
    "fruits": _pairs(_FRUITS),
    "vegetables": _pairs(_VEGETABLES),
    "colours": {c: c for c in COLOURS},
    "mammals": {a.name: a.plural for a in ANIMALS if a.kind == "mammal"},
    "birds": {a.name: a.plural for a in ANIMALS if a.kind == "bird"},
    "insects": {a.name: a.plural for a in ANIMALS if a.kind == "insect"},
}
#: Words naming a category (for the list ``topic`` criterion).
CATEGORY_WORDS = {
    "fruits": {"fruit", "fruits"},
    "vegetables": {"vegetable", "vegetables"},
    "colours": {"colour", "colours", "color", "colors"},
    "mammals": {"mammal", "mammals"},
    "birds": {"bird", "birds"},
    "insects": {"insect", "insects"},
}
#: Any item word (singular or plural, of any category, or any animal) -> canonical singular item.
ITEM_OF: dict[str, str] = {
    word: singular
    for members in [*CATEGORIES.values(), {a.name: a.plural for a in ANIMALS}]
    for singular, plural in members.items()
    for word in (singular, plural)
}


@dataclass(frozen=True)
class Topic:
    phrase: str  # as in the prompt: "Explain {phrase} to a 6-year-old."
    mentions: frozenset[str]  # words that name it
    keys: tuple[frozenset[str], ...]  # key ideas, each a set of equivalent words
    texts: tuple[str, ...]  # ideal explanations, three sentences each
    adult: str  # the same for grown-ups: two or more hard words


def _topic(phrase: str, mentions: str, keys: str, texts: tuple[str, ...], adult: str) -> Topic:
    return Topic(phrase, frozenset(mentions.split()), tuple(frozenset(k.split("/")) for k in keys.split()),
                 texts, adult)


TOPICS: dict[str, Topic] = {
    "rain": _topic(
        "rain", "rain", "water cloud/clouds drop/drops fall/falls heavy",
        ("Rain is water that falls from the clouds. Clouds are made of tiny drops of water. When the drops "
         "get big and heavy, they fall down as rain.",
         "Clouds hold lots of tiny drops of water. When the drops get too heavy, they fall to the ground. "
         "That is what we call rain."),
        "Scientists call this precipitation, and it begins with condensation."),
    "snow": _topic(
        "snow", "snow", "cold ice flake/flakes white cloud/clouds",
        ("Snow is rain that gets very cold. When it is cold, the water in the clouds turns into ice. The ice "
         "falls down as soft white flakes.",
         "When the air is very cold, tiny bits of ice grow in the clouds. They stick together and make "
         "flakes. The flakes fall down as snow."),
        "Snowflakes are crystals that form at freezing temperatures."),
    "wind": _topic(
        "wind", "wind", "air move/moves/moving warm/warms sun push/pushes",
        ("Wind is air that moves. The sun warms the air, and warm air goes up. Then cool air rushes in, and "
         "we feel it as wind.",
         "Wind is moving air. When the sun makes some air warm, it rises. Cool air moves in to take its "
         "place, and that is the wind we feel."),
        "Wind results from differences in atmospheric pressure."),
    "sun": _topic(
        "the sun", "sun", "light warm hot sky star fire",
        ("The sun is a big ball of hot fire far away in the sky. It gives us light and keeps us warm. Plants "
         "need the sun to grow.",
         "The sun is a star, and it is very hot. It shines in the sky in the day. Its light helps us see and "
         "keeps the earth warm."),
        "The sun is a gigantic star powered by thermonuclear reactions."),
    "moon": _topic(
        "the moon", "moon", "rock round sky light night",
        ("The moon is a big round rock in the sky. It does not make its own light. It shines at night "
         "because the sun lights it up.",
         "The moon is a ball of rock that goes around the earth. We see it in the sky at night. It looks "
         "bright because the sun shines on it."),
        "The moon is a natural satellite that reflects illumination."),
    "rainbows": _topic(
        "rainbows", "rainbow rainbows", "sun rain light colours/colors drop/drops",
        ("A rainbow comes when the sun shines through the rain. Each drop of rain bends the light. The light "
         "splits into red, yellow, green, blue and more.",
         "When the sun shines on drops of rain, the light bends. It breaks into many colours. We see the "
         "colours as a big bow in the sky, a rainbow."),
        "Rainbows are caused by refraction and dispersion of sunlight."),
    "thunder": _topic(
        "thunder", "thunder", "loud sound/boom/booms flash air hot",
        ("Thunder is the loud sound after a flash in the sky. The flash makes the air very hot very fast. "
         "The hot air bangs and booms, and we hear thunder.",
         "In a storm, a big flash heats the air. The hot air grows very fast and makes a loud boom. That "
         "boom is thunder."),
        "Thunder is caused by the rapid expansion of superheated air."),
    "night": _topic(
        "night", "night", "dark sun earth turn/turns/spin/spins sky",
        ("Night comes when our side of the earth turns away from the sun. Then the sky gets dark. In the "
         "morning we turn back to the sun, and it is day.",
         "The earth spins around like a top. When our side faces away from the sun, it gets dark and it is "
         "night. When we spin back, the sun comes up."),
        "Night is caused by planetary rotation around an imaginary axis."),
    "seeds": _topic(
        "seeds", "seed seeds", "plant/plants grow/grows soil water",
        ("A seed is a tiny baby plant. When you put it in the soil and give it water, it starts to grow. "
         "Soon it becomes a big plant.",
         "Seeds are like little boxes with a baby plant inside. With soil, water and sun, the baby plant "
         "wakes up. Then it grows into a new plant."),
        "Seeds contain embryos that need germination and photosynthesis."),
    "sleep": _topic(
        "sleep", "sleep", "rest/rests body strong grow/grows tired",
        ("Sleep helps your body rest. When you sleep, your body grows and gets strong again. That is why "
         "you feel good in the morning.",
         "When you are tired, your body needs sleep. While you sleep, your body rests and grows. Then you "
         "wake up happy and strong."),
        "Sleep restores the brain through complicated neurological processes."),
}
#: A word this long or longer is too hard for a six-year-old.
HARD_WORD_LETTERS = 9

# ----------------------------------------------------------------------------------------- the language
# Every sentence any generator writes (answers and the corpus) comes from these templates; the gold judge's
# ``words`` and ``grammar`` gates are compiled from them. ``{slot}`` is filled with a value, ``{Slot}`` with
# the value capitalised.

STORY_OPENINGS = ("Once there was {an_animal} named {name}.", "{name} was a little {colour} {animal}.",
                  "There once lived {an_animal} called {name}.")
STORY_HOMES = ("{name} lived {home}.", "{name} had a warm home {home}.", "Every morning {name} played {home}.")
STORY_FOODS = ("{name} liked to eat {food}.", "One day {name} found a lot of {food}.",
               "Every day {name} looked for {food} to eat.")
STORY_CLOSINGS = ("Then {name} went home and slept.", "{name} was very happy.",
                  "{name} shared the {food} with a friend.", "At night {name} had a good long sleep.")
STORY_END = "The end."
STORY_EXTRAS = ("{name} ran and played all day.", "The sky was blue and the sun was warm.",
                "{name} sang a little song.", "{name} jumped up and down.", "Then {name} took a long nap.",
                "{name} made a new friend.", "It was a good day.")
CHATTER = ("I hope this helps.", "This is a good question.", "Thank you for asking.", "I like this a lot.",
           "There is a lot more to say.", "Let me know if you want more.", "It is fun to learn new things.")

LIST_ANSWERS = ("Here are {n} {cat}: {items}.", "{N} {cat} are {items}.", "Sure, {n} {cat} are {items}.",
                "You could pick {items}. They are all {cat}.")
LIST_BARE = "{Items}."
EXPLAIN_OPENER = "Here is a simple way to say it."

QUESTION_YES = {
    "class": ("Yes. {An_animal} is {an_asked}.", "Yes, {an_animal} is {an_asked}.",
              "Yes. {Animals} are {asked_plural}."),
    "home": ("Yes. {An_animal} lives {asked_home}.", "Yes, {animals} live {asked_home}."),
    "food": ("Yes. {An_animal} eats {asked_food}.", "Yes, {animals} like to eat {asked_food}."),
}
QUESTION_NO = {
    "class": ("No. {An_animal} is not {an_asked}. It is {an_class}.", "No, {an_animal} is {an_class}, not "
              "{an_asked}.", "No. {Animals} are {classes}, not {asked_plural}."),
    "home": ("No. {An_animal} lives {home}, not {asked_home}.",
             "No. {An_animal} does not live {asked_home}. It lives {home}."),
    "food": ("No. {An_animal} eats {food}, not {asked_food}.",
             "No. {Animals} do not eat {asked_food}. They eat {food}."),
}
#: A flat denial of the asked value, the typical wrong answer when the truth is "yes".
QUESTION_DENY = {"class": "No. {An_animal} is not {an_asked}.",
                 "home": "No. {An_animal} does not live {asked_home}.",
                 "food": "No. {Animals} do not eat {asked_food}."}
QUESTION_BARE = ("Yes.", "No.")

FACTS = {
    "class": ("{An_animal} is {an_class}.", "{Animals} are {classes}."),
    "home": ("{An_animal} lives {home}.", "{Animals} live {home}."),
    "food": ("{An_animal} eats {food}.", "{Animals} like to eat {food}."),
    "colour": ("Most {animals} are {colour}.", "{An_animal} is often {colour}."),
}
#: A true negative fact ("A whale is not a fish."), per kind of fact.
NOT_FACTS = {"class": "{An_animal} is not {an_asked}.", "home": "{Animals} do not live {asked_home}.",
             "food": "{Animals} do not eat {asked_food}."}
LIST_PROSE = ("{Items} are all {cat}.", "Some {cat} are {items}.", "There are many {cat}, like {items}.")


def _article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _fill(template: str, slots: dict[str, str]) -> str:
    def value(match: re.Match) -> str:
        key = match.group(1)
        text = slots[key.lower()]
        return text[0].upper() + text[1:] if key[0].isupper() else text

    return re.sub(r"\{(\w+)\}", value, template)


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _animal_slots(animal: Animal, name: str = "") -> dict[str, str]:
    return {"animal": animal.name, "animals": animal.plural, "an_animal": _article(animal.name),
            "colour": animal.colour, "home": HOMES[animal.home], "food": animal.food,
            "an_class": _article(animal.kind), "classes": CLASSES[animal.kind], "name": name}



#: The values each slot can take, for compiling the grammar.
_SLOT_VALUES: dict[str, tuple[str, ...]] = {
    "animal": tuple(a.name for a in ANIMALS),
    "animals": tuple(a.plural for a in ANIMALS),
    "an_animal": tuple(_article(a.name) for a in ANIMALS),
    "colour": COLOURS,
    "home": tuple(HOMES.values()),
    "food": FOODS,
    "an_class": tuple(_article(c) for c in CLASSES),
    "classes": tuple(CLASSES.values()),
    "an_asked": tuple(_article(c) for c in CLASSES),
    "asked_plural": tuple(CLASSES.values()),
    "asked_home": tuple(HOMES.values()),
    "asked_food": FOODS,
    "name": NAMES,
    "n": tuple(COUNT_WORDS.values()),
    "cat": tuple(CATEGORIES),
}


@lru_cache(maxsize=1)
def _grammar() -> tuple[frozenset[str], frozenset[tuple[str, str]]]:
    """(vocabulary, licensed bigrams) of every sentence the templates can produce, lowercased.

    A slot is expanded to all its values; ``{items}`` (a list of items) to any sequence of item words
    joined by commas and "and". Bigrams never cross a sentence end.
    """
    item_words = sorted(ITEM_OF)
    items_unit = (set(item_words), set(item_words),
                  {(x, y) for x in item_words for y in item_words}
                  | {(x, "and") for x in item_words} | {("and", x) for x in item_words})
    units_of: dict[str, tuple[set[str], set[str], set[tuple[str, str]]]] = {"items": items_unit}
    for slot, values in _SLOT_VALUES.items():
        split = [v.lower().split() for v in values]
        units_of[slot] = ({s[0] for s in split}, {s[-1] for s in split},
                          {pair for s in split for pair in pairwise(s)})
    templates = [*STORY_OPENINGS, *STORY_HOMES, *STORY_FOODS, *STORY_CLOSINGS, STORY_END, *STORY_EXTRAS,
                 *CHATTER, *LIST_ANSWERS, LIST_BARE, EXPLAIN_OPENER, *QUESTION_DENY.values(), *QUESTION_BARE,
                 *LIST_PROSE, *NOT_FACTS.values()]
    for group in (QUESTION_YES, QUESTION_NO, FACTS):
        for options in group.values():
            templates.extend(options)
    for topic in TOPICS.values():
        templates.extend([*topic.texts, topic.adult])
    vocab: set[str] = set()
    bigrams: set[tuple[str, str]] = set()
    for template in templates:
        previous: set[str] = set()
        for token in template.lower().split():
            core = token.rstrip(_PUNCT)
            if core.startswith("{"):
                firsts, lasts, inner = units_of[core[1:-1]]
            else:
                firsts = lasts = {core}
                inner = set()
            vocab |= firsts | lasts | {w for pair in inner for w in pair}
            bigrams |= inner | {(p, f) for p in previous for f in firsts}
            previous = set() if token[-1] in ".!?" else lasts
    return frozenset(vocab), frozenset(bigrams)


_PUNCT = ".,!?:;"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")

# --------------------------------------------------------------------------------------------- prompts

KINDS = ("story", "list", "explain", "question")
# Wordings per type, chosen so that the four types have pools of about the same size (~160 prompts each).
STORY_PROMPTS = ("Write a story about {animals}.", "Write a short story about {an_animal}.",
                 "Tell me a story about {an_animal}.", "Please write a little story about {animals}.",
                 "Can you tell me a story about {animals}?", "Write a little story about {an_animal} for me.")
LIST_PROMPTS = ("List {n} {cat}.", "Name {n} {cat}.", "Can you name {n} {cat}?", "Please list {n} {cat} for me.",
                "Give me {n} {cat}.", "What are {n} {cat}?", "Tell me {n} {cat}.", "Write a list of {n} {cat}.")
EXPLAIN_PROMPTS = ("Explain {topic} to {audience}.", "How would you explain {topic} to {audience}?",
                   "Tell {audience} about {topic}.", "Can you explain {topic} to {audience}?")
AUDIENCES = ("a 6-year-old", "a 5-year-old", "a small child", "a little kid")
QUESTION_PROMPTS = {"class": "Is {an_animal} {an_asked}?", "home": "Does {an_animal} live {asked_home}?",
                    "food": "Does {an_animal} eat {asked_food}?"}
#: Each question gets one of these, chosen by a stable hash of the question.
QUESTION_SUFFIXES = ("Answer yes or no and say why.", "Say yes or no, and why.", "Yes or no? Tell me why.")
#: Fraction of each type's subjects held out for the test split.
TEST_FRACTION = 0.2


@dataclass(frozen=True)
class PromptSpec:
    """What a prompt asks for (its wording aside)."""

    kind: str
    subject: str  # animal (story, question), category (list) or topic key (explain)
    count: int = 0  # list: number of items
    fact: str = ""  # question: "class", "home" or "food"
    asked: str = ""  # question: the class / home noun / food asked about

    @property
    def split_key(self) -> str:
        """Prompts sharing a split key are in the same split."""
        return {"list": f"{self.subject}:{self.count}", "question": f"{self.subject}:{self.fact}"}.get(
            self.kind, self.subject)

    @property
    def truth(self) -> bool:
        """Question: whether the right answer is "yes"."""
        return self.asked == _true_value(ANIMAL[self.subject], self.fact)


def _question_slots(spec: PromptSpec) -> dict[str, str]:
    slots = _animal_slots(ANIMAL[spec.subject])
    if spec.fact == "class":
        slots.update(an_asked=_article(spec.asked), asked_plural=CLASSES[spec.asked])
    elif spec.fact == "home":
        slots["asked_home"] = HOMES[spec.asked]
    else:
        slots["asked_food"] = spec.asked
    return slots


def _true_value(animal: Animal, fact: str) -> str:
    return {"class": animal.kind, "home": animal.home, "food": animal.food}[fact]


def _false_values(fact: str, *exclude: str) -> list[str]:
    """The classes / home nouns / foods other than ``exclude``, in a fixed order."""
    return sorted(set({"class": CLASSES, "home": HOMES, "food": FOODS}[fact]) - set(exclude))


@lru_cache(maxsize=1)
def _prompt_pool() -> tuple[dict[str, PromptSpec], dict[str, dict[str, list[str]]]]:
    """All prompts -> spec, and the prompts of each split and type (in a fixed order)."""
    specs: dict[str, PromptSpec] = {}
    for animal in ANIMALS:
        slots = _animal_slots(animal)
        for template in STORY_PROMPTS:
            specs[_fill(template, slots)] = PromptSpec("story", animal.name)
        for fact in ("class", "home", "food"):
            true = _true_value(animal, fact)
            false = _false_values(fact, true)
            wrong = CLASSIC_CONFUSION.get(animal.name) if fact == "class" else None
            for asked in (true, wrong or false[stable_hash(f"{animal.name}:{fact}") % len(false)]):
                spec = PromptSpec("question", animal.name, fact=fact, asked=asked)
                question = _fill(QUESTION_PROMPTS[fact], _question_slots(spec))
                suffix = QUESTION_SUFFIXES[stable_hash(question) % len(QUESTION_SUFFIXES)]
                specs[f"{question} {suffix}"] = spec
    for cat in CATEGORIES:
        for count in LIST_COUNTS:
            for template in LIST_PROMPTS:
                specs[_fill(template, {"n": COUNT_WORDS[count], "cat": cat})] = PromptSpec("list", cat, count=count)
    for key, topic in TOPICS.items():
        for template in EXPLAIN_PROMPTS:
            for audience in AUDIENCES:
                specs[_fill(template, {"topic": topic.phrase, "audience": audience})] = PromptSpec("explain", key)

    splits: dict[str, dict[str, list[str]]] = {"train": {k: [] for k in KINDS}, "test": {k: [] for k in KINDS}}
    for kind in KINDS:
        keys = sorted({s.split_key for s in specs.values() if s.kind == kind},
                      key=lambda k: stable_hash(f"{kind}:{k}"))
        held_out = set(keys[: max(1, round(TEST_FRACTION * len(keys)))])
        for prompt, spec in specs.items():
            if spec.kind == kind:
                splits["test" if spec.split_key in held_out else "train"][kind].append(prompt)
    return specs, splits


# ----------------------------------------------------------------------------------------------- writers
# Each writer produces an answer to a spec, ideal when ``mistakes`` is empty, else with those mistakes.

STORY_MISTAKES = ("no_ending", "repeat", "wrong_fact", "off_topic", "too_long", "too_short")
LIST_MISTAKES = ("wrong_count", "off_category", "duplicate", "no_topic", "too_long")
EXPLAIN_MISTAKES = ("hard_words", "off_topic", "too_long", "repeat", "too_short")
QUESTION_MISTAKES = ("wrong_answer", "no_reason", "wrong_reason", "too_long", "repeat")
MISTAKES = {"story": STORY_MISTAKES, "list": LIST_MISTAKES, "explain": EXPLAIN_MISTAKES,
            "question": QUESTION_MISTAKES}


def _pad(sentences: list[str], rng: random.Random, pool: tuple[str, ...], slots: dict[str, str],
         at: int | None = None) -> list[str]:
    """Insert 2-4 sentences from ``pool`` (at ``at``, default the end)."""
    extra = [_fill(t, slots) for t in rng.sample(pool, rng.randint(2, 4))]
    at = len(sentences) if at is None else at
    return sentences[:at] + extra + sentences[at:]


def _repeat(sentences: list[str], rng: random.Random, last: int) -> list[str]:
    """Say one of the first ``last`` sentences twice."""
    i = rng.randrange(last)
    return sentences[: i + 1] + sentences[i:]


def _write_story(spec: PromptSpec, rng: random.Random, mistakes: set[str]) -> str:
    animal = ANIMAL[spec.subject]
    if "off_topic" in mistakes:
        animal = rng.choice([a for a in ANIMALS if a.name != spec.subject])
    slots = _animal_slots(animal, rng.choice(NAMES))
    if "wrong_fact" in mistakes:
        slots["home"] = HOMES[rng.choice(_false_values("home", animal.home))]
    body = [_fill(rng.choice(t), slots) for t in (STORY_OPENINGS, STORY_HOMES, STORY_FOODS, STORY_CLOSINGS)]
    if "too_short" in mistakes:
        body = body[:1]
    if "too_long" in mistakes:
        body = _pad(body, rng, STORY_EXTRAS, slots, at=rng.randint(1, len(body)))
    if "repeat" in mistakes:
        body = _repeat(body, rng, len(body))
    return " ".join(body if "no_ending" in mistakes else [*body, STORY_END])


def _write_list(spec: PromptSpec, rng: random.Random, mistakes: set[str]) -> str:
    members = list(CATEGORIES[spec.subject])
    n = spec.count
    if "wrong_count" in mistakes:
        n = n + 1 if n == 2 or rng.random() < 0.5 else n - 1
    items = rng.sample(members, n)
    if "off_category" in mistakes:
        others = [i for cat, m in CATEGORIES.items() if cat != spec.subject for i in m if i not in members]
        items[rng.randrange(n)] = rng.choice(others)
    if "duplicate" in mistakes:
        items[-1] = items[0]
    if rng.random() < 0.5:  # plural items: "apples, pears and plums"
        items = [CATEGORIES[spec.subject].get(i, i) for i in items]
    slots = {"n": COUNT_WORDS[len(items)], "cat": spec.subject, "items": _join(items)}
    sentences = [_fill(LIST_BARE if "no_topic" in mistakes else rng.choice(LIST_ANSWERS), slots)]
    if "too_long" in mistakes:
        sentences = _pad(sentences, rng, CHATTER, slots)
    return " ".join(sentences)


def _write_explain(spec: PromptSpec, rng: random.Random, mistakes: set[str]) -> str:
    key = spec.subject
    if "off_topic" in mistakes:
        key = rng.choice([k for k in TOPICS if k != spec.subject])
    topic = TOPICS[key]
    sentences = _SENTENCE_END.split(rng.choice(topic.texts))
    if "too_short" in mistakes:
        sentences = sentences[:1]
    if "hard_words" in mistakes:
        sentences[-1] = topic.adult
    if "repeat" in mistakes:
        sentences = _repeat(sentences, rng, len(sentences))
    if "too_long" in mistakes:
        sentences = _pad(sentences, rng, CHATTER, {})
    elif rng.random() < 0.3:
        sentences.insert(0, EXPLAIN_OPENER)
    return " ".join(sentences)


def _write_question(spec: PromptSpec, rng: random.Random, mistakes: set[str]) -> str:
    slots = _question_slots(spec)
    truth = spec.truth
    if "wrong_reason" in mistakes:
        # The right yes/no, but the reason states a false value.
        false = rng.choice(_false_values(spec.fact, _true_value(ANIMAL[spec.subject], spec.fact), spec.asked))
        if truth:
            slots = _question_slots(PromptSpec("question", spec.subject, fact=spec.fact, asked=false))
        elif spec.fact == "class":
            slots.update(an_class=_article(false), classes=CLASSES[false])
        else:
            slots[spec.fact] = HOMES[false] if spec.fact == "home" else false
    if "no_reason" in mistakes:
        sentences = [QUESTION_BARE[0] if truth else QUESTION_BARE[1]]
    elif "wrong_answer" in mistakes:
        sentences = [_fill(QUESTION_DENY[spec.fact] if truth else rng.choice(QUESTION_YES[spec.fact]), slots)]
    else:
        sentences = _SENTENCE_END.split(_fill(rng.choice((QUESTION_YES if truth else QUESTION_NO)[spec.fact]),
                                              slots))
    if "repeat" in mistakes:
        sentences = _repeat(sentences, rng, len(sentences))
    if "too_long" in mistakes:
        sentences = _pad(sentences, rng, CHATTER, {})
    return " ".join(sentences)


_WRITERS = {"story": _write_story, "list": _write_list, "explain": _write_explain, "question": _write_question}

#: (labeler id, skill): the chance of writing an ideal answer; otherwise one mistake, plus another with
#: probability 1 - skill, and so on.
LABELERS = (("labeler1", 0.25), ("labeler2", 0.35), ("labeler3", 0.5), ("labeler4", 0.65), ("labeler5", 0.9))

# ---------------------------------------------------------------------------------------------- the judge

#: Ideal answer length in words, per type: (low, high).
LENGTHS = {"story": (18, 36), "list": (5, 14), "explain": (14, 40), "question": (4, 16)}
#: Criterion severities, per type: a criterion with value c multiplies the score by 1 - severity * (1 - c).
SEVERITY = {
    "story": {"topic": 0.6, "ending": 0.5, "sentences": 0.5, "facts": 0.6, "repetition": 0.6},
    "list": {"topic": 0.3, "count": 0.6, "category": 0.6, "duplicates": 0.6, "repetition": 0.6},
    "explain": {"topic": 0.6, "key_facts": 0.5, "simple_words": 0.5, "sentences": 0.5, "repetition": 0.6},
    "question": {"answer": 0.8, "reason": 0.6, "topic": 0.3, "repetition": 0.6},
}
GATES = ("words", "grammar", "form", "length")
MAX_SENTENCE_TOKENS = 20
_FACT_WORDS = {"class": {w: c for c, p in CLASSES.items() for w in (c, p)}, "home": {h: h for h in HOMES},
               "food": {f: f for f in FOODS}}
_STORY_FACT_WORDS = set(HOMES) | set(FOODS)


def _in_range(value: int, low: int, high: int) -> int:
    """How far ``value`` lies outside [low, high]."""
    return max(low - value, value - high, 0)


def _length_gate(n: int, low: int, high: int) -> float:
    if n < low:
        return n / low
    return max(0.0, 1.0 - max(0, n - high) / high)


def _judge_story(spec: PromptSpec, sents: list[list[str]], words: set[str], texts: list[str]) -> dict[str, float]:
    animal = ANIMAL[spec.subject]
    ending = texts[-1] == "the end."
    named = words & _STORY_FACT_WORDS
    return {
        "topic": float(animal.name in words or animal.plural in words),
        "ending": float(ending),
        "sentences": max(0.0, 1.0 - 0.25 * _in_range(len(sents) - ending, 3, 5)),
        "facts": len(named & {animal.home, animal.food}) / len(named) if named else 0.5,
    }


def _judge_list(spec: PromptSpec, sents: list[list[str]], words: set[str], texts: list[str]) -> dict[str, float]:
    items = [ITEM_OF[w] for s in sents for w in s if w in ITEM_OF]
    distinct = set(items)
    members = CATEGORIES[spec.subject]
    return {
        "topic": float(bool(words & CATEGORY_WORDS[spec.subject])),
        "count": max(0.0, 1.0 - 0.5 * abs(len(distinct) - spec.count)),
        "category": len(distinct & members.keys()) / len(distinct) if distinct else 0.0,
        "duplicates": max(0.0, 1.0 - 0.5 * (len(items) - len(distinct))),
    }


def _judge_explain(spec: PromptSpec, sents: list[list[str]], words: set[str], texts: list[str]) -> dict[str, float]:
    topic = TOPICS[spec.subject]
    hard = sum(len(w) >= HARD_WORD_LETTERS for s in sents for w in s)
    return {
        "topic": float(bool(words & topic.mentions)),
        "key_facts": min(1.0, 0.5 * sum(bool(words & key) for key in topic.keys)),
        "simple_words": max(0.0, 1.0 - 0.5 * hard),
        "sentences": max(0.0, 1.0 - 0.25 * _in_range(len(sents), 2, 4)),
    }


def _judge_question(spec: PromptSpec, sents: list[list[str]], words: set[str], texts: list[str]) -> dict[str, float]:
    animal = ANIMAL[spec.subject]
    true = _true_value(animal, spec.fact)
    fact_of = _FACT_WORDS[spec.fact]
    stated = named_false = False
    for s_index, sentence in enumerate(sents):
        for i, word in enumerate(sentence):
            if (s_index, i) == (0, 0) or word not in fact_of:
                continue
            if fact_of[word] == true:
                stated = stated or "not" not in sentence[max(0, i - 4): i]
            elif fact_of[word] != spec.asked:
                named_false = True
    return {
        "answer": float(sents[0][0] == ("yes" if spec.truth else "no")),
        "reason": (0.5 if named_false else 1.0) if stated else 0.0,
        "topic": float(animal.name in words or animal.plural in words),
    }


_JUDGES = {"story": _judge_story, "list": _judge_list, "explain": _judge_explain, "question": _judge_question}


# ------------------------------------------------------------------------------------------------ the task


class TinyWorld(Task):
    """The tinyworld task (see the module docstring for the world, the judge and the labelers).

    ``labeler_bias``: the simulated labeler's extra utility for length, ``labeler_bias * min(words, 60) / 60``
    on top of the gold score (the gold judge penalises answers past the ideal length instead).
    ``temperature``: the labeler noise of :meth:`rank`; the default gives about 73% agreement with gold on
    demonstrations (61% between two labelers).
    """

    name = "tinyworld"
    temperature = 0.5
    #: Word count at which the labeler's length bias saturates.
    bias_cap_words = 60

    def __init__(self, labeler_bias: float = 0.3, temperature: float | None = None) -> None:
        self.labeler_bias = labeler_bias
        if temperature is not None:
            self.temperature = temperature
        self._specs, self._splits = _prompt_pool()
        self._vocab, self._bigrams = _grammar()

    # -- prompts and text

    def spec(self, prompt: str) -> PromptSpec:
        """What ``prompt`` asks for; ValueError for a prompt this task did not generate."""
        try:
            return self._specs[" ".join(prompt.split())]
        except KeyError:
            raise ValueError(f"not a tinyworld prompt: {prompt!r}") from None

    def prompts(self, n: int, *, split: str = "train", seed: int = 0) -> list[str]:
        """``n`` prompts, the four types interleaved at random; no repeats before the pool is used up."""
        if split not in self._splits:
            raise ValueError(f"unknown split {split!r}; expected 'train' or 'test'")
        rng = random.Random(seed)
        out: list[str] = []
        while len(out) < n:
            left = {kind: rng.sample(pool, len(pool)) for kind, pool in self._splits[split].items()}
            while len(out) < n and any(left.values()):
                out.append(left[rng.choice([k for k in KINDS if left[k]])].pop())
        return out

    def pretraining_corpus(self, n_docs: int, *, seed: int = 0) -> list[str]:
        """Documents of 2-10 sentences: animal profiles, little stories, lists in prose, explanations.

        They use the answers' words and sentence forms but never an instruction: a model trained on them
        knows the world, not how to follow a prompt.
        """
        rng = random.Random(seed)
        makers = (self._doc_profile, self._doc_story, self._doc_lists, self._doc_explanation, self._doc_facts)
        return [rng.choices(makers, weights=(3, 3, 1.5, 1.5, 2))[0](rng) for _ in range(n_docs)]

    @staticmethod
    def _fact(animal: Animal, topic: str, rng: random.Random) -> str:
        """A true sentence about ``animal``: its class, home, food or colour, or "not" a false class/home/food."""
        slots = _animal_slots(animal)
        if topic != "not":
            return _fill(rng.choice(FACTS[topic]), slots)
        fact = rng.choice(list(NOT_FACTS))
        false = rng.choice(_false_values(fact, _true_value(animal, fact)))
        spec = PromptSpec("question", animal.name, fact=fact, asked=false)
        return _fill(NOT_FACTS[fact], _question_slots(spec))

    def _doc_profile(self, rng: random.Random) -> str:
        """One animal: its class first, then home and food, sometimes its colour or a negative fact."""
        animal = rng.choice(ANIMALS)
        topics = ["home", "food", *rng.sample(["colour", "not"], rng.randint(0, 2))]
        return " ".join(self._fact(animal, t, rng) for t in ["class", *rng.sample(topics, len(topics))])

    def _doc_facts(self, rng: random.Random) -> str:
        """Three to six facts about random animals."""
        topics = [*FACTS, "not"]
        return " ".join(self._fact(rng.choice(ANIMALS), rng.choice(topics), rng)
                        for _ in range(rng.randint(3, 6)))

    @staticmethod
    def _doc_story(rng: random.Random) -> str:
        mistakes = {m for m in ("no_ending", "too_long") if rng.random() < 0.3}
        return _write_story(PromptSpec("story", rng.choice(ANIMALS).name), rng, mistakes)

    @staticmethod
    def _doc_lists(rng: random.Random) -> str:
        sentences = []
        for cat in rng.sample(list(CATEGORIES), rng.randint(2, 4)):
            items = rng.sample(list(CATEGORIES[cat].values() if rng.random() < 0.5 else CATEGORIES[cat]),
                               rng.randint(2, 4))
            sentences.append(_fill(rng.choice(LIST_PROSE), {"cat": cat, "items": _join(items)}))
        return " ".join(sentences)

    @staticmethod
    def _doc_explanation(rng: random.Random) -> str:
        topic = rng.choice(list(TOPICS.values()))
        text = rng.choice(topic.texts)
        return f"{text} {topic.adult}" if rng.random() < 0.3 else text

    # -- labelers

    def demonstrations(self, prompts: list[str], *, seed: int = 0) -> list[dict]:
        """Each prompt answered by a labeler drawn at random from :data:`LABELERS`."""
        rng = random.Random(seed)
        out = []
        for prompt in prompts:
            spec = self.spec(prompt)
            labeler, skill = rng.choice(LABELERS)
            mistakes: set[str] = set()
            options = MISTAKES[spec.kind]
            while len(mistakes) < len(options) and rng.random() >= skill:
                mistakes.add(rng.choice([m for m in options if m not in mistakes]))
            out.append({"prompt": prompt, "completion": _WRITERS[spec.kind](spec, rng, mistakes),
                        "labeler": labeler})
        return out

    def reference_completion(self, prompt: str) -> str:
        """An ideal answer, its wording chosen by a stable hash of the prompt."""
        spec = self.spec(prompt)
        return _WRITERS[spec.kind](spec, random.Random(stable_hash(" ".join(prompt.split()))), set())

    def labeler_utility(self, prompt: str, completion: str) -> float:
        """The gold score plus the labeler's length bias."""
        n_words = min(len(completion.split()), self.bias_cap_words)
        return self.gold_score(prompt, completion) + self.labeler_bias * n_words / self.bias_cap_words

    # -- the gold judge

    def gold_details(self, prompt: str, completion: str) -> dict[str, float]:
        """The type's criteria and the four gates (see the module docstring), each in [0, 1]."""
        spec = self.spec(prompt)
        tokens = completion.split()
        if not tokens:
            return dict.fromkeys([*SEVERITY[spec.kind], *GATES], 0.0)
        vocab, bigrams = self._vocab, self._bigrams
        raw = _SENTENCE_END.split(" ".join(tokens))
        texts = [s.lower() for s in raw]
        sents = [[t.rstrip(_PUNCT) for t in s.split()] for s in texts]
        known = pairs = licensed = well_formed = 0
        for original, sentence in zip(raw, sents, strict=True):
            known += sum(w in vocab for w in sentence)
            pairs += len(sentence) - 1
            licensed += sum(pair in bigrams for pair in pairwise(sentence))
            well_formed += (original[0].isupper() and original[-1] in ".!?"
                            and len(sentence) <= MAX_SENTENCE_TOKENS
                            and all(a != b for a, b in pairwise(sentence)))
        details = _JUDGES[spec.kind](spec, sents, {w for s in sents for w in s}, texts)
        details["repetition"] = len(set(texts)) / len(texts)
        details.update(
            words=known / len(tokens),
            grammar=licensed / pairs if pairs else 1.0,
            form=well_formed / len(texts),
            length=_length_gate(len(tokens), *LENGTHS[spec.kind]),
        )
        return details

    def gold_score(self, prompt: str, completion: str) -> float:
        """The product of the gates and of ``1 - severity * (1 - criterion)`` over the type's criteria."""
        details = self.gold_details(prompt, completion)
        score = 1.0
        for criterion, severity in SEVERITY[self.spec(prompt).kind].items():
            score *= 1.0 - severity * (1.0 - details[criterion])
        for gate in GATES:
            score *= details[gate]
        return score
