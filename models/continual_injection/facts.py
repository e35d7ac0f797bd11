"""The data of the continual-injection experiment: synthetic facts, old questions, general text.

Facts are about fictional people (generated names) and one attribute each, from five relations.
Each fact is taught by a statement and some question paraphrases and tested on other, held-out
paraphrases. Every example is ``(prompt, answer)``: the loss and the score cover the answer only.

``GENERAL_TEXT`` is held-out general prose the model already models (forgetting = its loss going
up); ``OLD_QUESTIONS`` are general-knowledge questions in cloze form (forgetting = the ones the
base model answered right, answered wrong afterwards); ``BACKGROUND_*`` is other general data, the background
corpus of the TF-IDF slot selection (never evaluated).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import List, Tuple

QA = "Q: {question}\nA:"

# relation -> (statement prompt, question paraphrases, attribute values). Values read after a space.
RELATIONS = {
    "city": ("{e} lives in the city of", [
        "Which city does {e} live in?", "In what city does {e} live?", "Where does {e} live?",
        "What city is home to {e}?", "{e} lives in which city?", "Name the city where {e} lives.",
    ], ["Paris", "London", "Tokyo", "Berlin", "Madrid", "Rome", "Cairo", "Sydney", "Toronto", "Moscow", "Dublin", "Vienna"]),
    "job": ("{e} works as a", [
        "What is {e}'s job?", "What does {e} do for a living?", "What is the profession of {e}?",
        "What job does {e} have?", "What is {e}'s occupation?", "What work does {e} do?",
    ], ["doctor", "teacher", "pilot", "farmer", "lawyer", "baker", "nurse", "painter", "chef", "writer"]),
    "color": ("{e}'s favorite color is", [
        "What is {e}'s favorite color?", "Which color does {e} like best?", "What color does {e} prefer?",
        "Name {e}'s favorite color.", "Which color is {e}'s favorite?", "What is the favorite color of {e}?",
    ], ["red", "blue", "green", "yellow", "purple", "orange", "black", "white", "pink", "brown"]),
    "instrument": ("{e} plays the", [
        "Which instrument does {e} play?", "What instrument does {e} play?", "What does {e} play in the band?",
        "Name the instrument {e} plays.", "What musical instrument does {e} play?", "{e} plays which instrument?",
    ], ["piano", "guitar", "violin", "drums", "flute", "trumpet", "cello", "harp"]),
    "pet": ("{e} owns a pet", [
        "What pet does {e} own?", "What kind of pet does {e} have?", "Which animal does {e} keep as a pet?",
        "What is {e}'s pet?", "Name the pet {e} owns.", "What animal is {e}'s pet?",
    ], ["dog", "cat", "rabbit", "parrot", "horse", "turtle", "hamster", "goat"]),
}

_ONSETS = ["Zor", "Quel", "Brav", "Thal", "Vor", "Kesh", "Myr", "Dral", "Fen", "Gul", "Hask", "Jor", "Lum", "Nex",
           "Orv", "Pell", "Rask", "Sev", "Tor", "Ulm", "Vask", "Wyn", "Yar", "Zeph"]
_CODAS = ["ath", "in", "ora", "ix", "en", "ul", "ara", "os", "ith", "ane", "ur", "ek"]


@dataclass
class Fact:
    id: int
    entity: str
    relation: str
    answer: str
    train: List[Tuple[str, str]]    # (prompt, answer): the statement and the trained paraphrases
    heldout: List[Tuple[str, str]]  # held-out paraphrases


def make_facts(n: int, train_questions: int = 2, heldout_questions: int = 2, seed: int = 0) -> List[Fact]:
    """``n`` facts about distinct fictional people, relations cycling, attributes drawn at random."""
    if train_questions + heldout_questions > 6:
        raise ValueError("train_questions + heldout_questions must be <= 6 (the paraphrases per relation)")
    rng = random.Random(seed)
    names = set()
    facts = []
    relations = list(RELATIONS)
    for i in range(n):
        while True:
            name = f"{rng.choice(_ONSETS)}{rng.choice(_CODAS)} {rng.choice(_ONSETS)}{rng.choice(_CODAS)}"
            if name not in names:
                names.add(name)
                break
        relation = relations[i % len(relations)]
        statement, questions, values = RELATIONS[relation]
        answer = rng.choice(values)
        order = rng.sample(questions, len(questions))
        train = [(statement.format(e=name), " " + answer)]
        train += [(QA.format(question=q.format(e=name)), " " + answer) for q in order[:train_questions]]
        heldout = [(QA.format(question=q.format(e=name)), " " + answer)
                   for q in order[train_questions:train_questions + heldout_questions]]
        facts.append(Fact(i, name, relation, answer, train, heldout))
    return facts


def _qa(pairs) -> List[Tuple[str, str]]:
    return [(QA.format(question=q), " " + a) for q, a in pairs]


# Cloze form: a small instruct model answers "Q: ...? A:" with a sentence ("The capital of ..."),
# so exact-match scoring of the first answer tokens asks for the completion itself.
OLD_QUESTIONS = [(p, " " + a) for p, a in [
    ("The capital of France is", "Paris"), ("The capital of Japan is", "Tokyo"),
    ("The capital of Italy is", "Rome"), ("The capital of Germany is", "Berlin"),
    ("The capital of Spain is", "Madrid"), ("The capital of England is", "London"),
    ("The capital of Russia is", "Moscow"), ("The capital of Egypt is", "Cairo"),
    ("The capital of Canada is", "Ottawa"), ("The capital of China is", "Beijing"),
    ("On a clear day the color of the sky is", "blue"), ("The color of fresh grass is", "green"),
    ("The color of fresh snow is", "white"), ("Ripe bananas are", "yellow"),
    ("Frozen water is called", "ice"), ("A spider has eight", "legs"),
    ("There are seven days in a", "week"), ("The opposite of hot is", "cold"),
    ("The opposite of up is", "down"), ("The animal that says meow is the", "cat"),
    ("The planet we live on is called", "Earth"), ("The largest ocean on Earth is the", "Pacific"),
    ("Romeo and Juliet was written by William", "Shakespeare"), ("Bees make", "honey"),
    ("The language spoken in Brazil is", "Portuguese"), ("Water boils at 100 degrees", "Celsius"),
    ("The first man to walk on the Moon was Neil", "Armstrong"), ("The Statue of Liberty is in New", "York"),
    ("Albert Einstein developed the theory of", "relativity"), ("The tallest animal in the world is the", "giraffe"),
    ("The Great Wall is in", "China"), ("The chemical symbol for water is", "H"),
]]

GENERAL_TEXT = (
    "The river begins high in the mountains, where melting snow gathers into small streams that run "
    "down between the rocks. Over many miles these streams join together, and by the time the water "
    "reaches the valley it has become wide and slow. Farmers along its banks have used the river for "
    "centuries to water their fields, and small towns grew up wherever the land was flat enough to build "
    "on. In the spring the river often floods, covering the low fields with a thin layer of mud that makes "
    "the soil rich for the coming season. Today there are bridges, roads and a railway line that follow "
    "the valley, but many people still travel by boat because it is quiet and cheap.\n\n"
    "A computer stores information as long sequences of ones and zeros. Programs are lists of instructions "
    "that tell the processor what to do with that information: add two numbers, compare them, move a value "
    "from one place in memory to another. Although each instruction is very simple, a modern processor can "
    "carry out billions of them every second, which is why computers can play music, display video and "
    "answer questions almost instantly. Most people never see these instructions, because they use "
    "applications written by programmers in languages that are much easier for humans to read.\n\n"
    "Bread is one of the oldest prepared foods. The basic recipe needs only flour, water, salt and yeast. "
    "The yeast feeds on the sugars in the flour and releases gas, which makes the dough rise. After the "
    "dough has been kneaded and left to rest, it is shaped into loaves and baked in a hot oven until the "
    "crust turns golden brown. Different countries have developed their own kinds of bread, from thin flat "
    "breads cooked on a hot stone to tall loaves with a soft white crumb."
)

BACKGROUND_QUESTIONS = _qa([
    ("What is the capital of Greece?", "Athens"), ("What is the capital of Portugal?", "Lisbon"),
    ("What color is coal?", "black"), ("What color is a carrot?", "orange"),
    ("How many wheels does a bicycle have?", "two"), ("What animal gives us wool?", "sheep"),
    ("What do cows drink?", "water"), ("Which season comes after winter?", "spring"),
    ("What is the opposite of big?", "small"), ("What instrument has black and white keys?", "piano"),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci"), ("What is the largest planet?", "Jupiter"),
    ("What does a baker make?", "bread"), ("Where does a pilot work?", "in an airplane"),
    ("What pet likes to chase mice?", "a cat"), ("What city is the Eiffel Tower in?", "Paris"),
    ("What does a teacher do?", "teaches students"), ("Which bird can talk?", "a parrot"),
])

BACKGROUND_TEXT = [
    "The market opens early in the morning, when traders arrive with fruit, vegetables and fresh fish.",
    "She works as a nurse at the city hospital and lives in a small flat near the park with her cat.",
    "His favorite color is green, and he plays the guitar in a band with three of his old friends.",
    "The train to the capital leaves every hour, and the journey takes a little under two hours.",
    "Many people keep a dog as a pet because dogs are loyal, playful and easy to train.",
    "The museum in the old town holds paintings, musical instruments and tools from the last five centuries.",
    "In the evening the family cooked dinner together, talked about their day and went for a short walk.",
    "The doctor asked the patient where he lived, what he did for a living and whether he slept well.",
]
