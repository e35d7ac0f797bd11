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
# so exact-match scoring of the first answer tokens asks for the completion itself. A large set
# written here (no download), so that the ones the base model answers right are many and a drop is
# measured in small steps; none of them is in the background corpus.
_CAPITALS = [
    ("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Germany", "Berlin"), ("Spain", "Madrid"),
    ("England", "London"), ("Russia", "Moscow"), ("Egypt", "Cairo"), ("Canada", "Ottawa"), ("China", "Beijing"),
    ("Ireland", "Dublin"), ("Austria", "Vienna"), ("Norway", "Oslo"), ("Sweden", "Stockholm"),
    ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Poland", "Warsaw"), ("Hungary", "Budapest"),
    ("Belgium", "Brussels"), ("the Netherlands", "Amsterdam"), ("Switzerland", "Bern"), ("Turkey", "Ankara"),
    ("India", "New Delhi"), ("Thailand", "Bangkok"), ("South Korea", "Seoul"), ("Indonesia", "Jakarta"),
    ("the Philippines", "Manila"), ("Vietnam", "Hanoi"), ("Iran", "Tehran"), ("Iraq", "Baghdad"),
    ("Kenya", "Nairobi"), ("Nigeria", "Abuja"), ("Argentina", "Buenos Aires"), ("Peru", "Lima"),
    ("Chile", "Santiago"), ("Colombia", "Bogota"), ("Mexico", "Mexico City"), ("Cuba", "Havana"),
    ("Australia", "Canberra"), ("New Zealand", "Wellington"), ("the United States", "Washington"),
    ("Scotland", "Edinburgh"), ("Wales", "Cardiff"), ("Ukraine", "Kyiv"), ("the Czech Republic", "Prague"),
    ("Romania", "Bucharest"), ("Saudi Arabia", "Riyadh"), ("Israel", "Jerusalem"), ("Venezuela", "Caracas"),
]
_LANGUAGES = [
    ("Brazil", "Portuguese"), ("Mexico", "Spanish"), ("France", "French"), ("Germany", "German"),
    ("Italy", "Italian"), ("Japan", "Japanese"), ("China", "Chinese"), ("Russia", "Russian"),
    ("Greece", "Greek"), ("Sweden", "Swedish"), ("the Netherlands", "Dutch"), ("Poland", "Polish"),
    ("Turkey", "Turkish"), ("Korea", "Korean"), ("Argentina", "Spanish"), ("Egypt", "Arabic"),
]
_OPPOSITES = [
    ("hot", "cold"), ("up", "down"), ("day", "night"), ("black", "white"), ("fast", "slow"), ("old", "young"),
    ("happy", "sad"), ("open", "closed"), ("left", "right"), ("light", "dark"), ("wet", "dry"), ("hard", "soft"),
    ("early", "late"), ("rich", "poor"), ("full", "empty"), ("strong", "weak"), ("true", "false"),
    ("win", "lose"), ("love", "hate"), ("north", "south"), ("east", "west"), ("inside", "outside"),
    ("push", "pull"), ("buy", "sell"), ("first", "last"), ("thick", "thin"), ("heavy", "light"),
    ("top", "bottom"), ("start", "finish"), ("yes", "no"),
]
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December"]
_NUMBERS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]
_YOUNG = [("dog", "puppy"), ("cat", "kitten"), ("cow", "calf"), ("sheep", "lamb"), ("horse", "foal"),
          ("frog", "tadpole"), ("goat", "kid"), ("bear", "cub"), ("duck", "duckling"), ("swan", "cygnet")]
_SOUNDS = [("moo", "cow"), ("woof", "dog"), ("meow", "cat"), ("quack", "duck"), ("oink", "pig"), ("baa", "sheep"),
           ("neigh", "horse"), ("hiss", "snake"), ("roar", "lion"), ("buzz", "bee")]
_PLURALS = [("mouse", "mice"), ("child", "children"), ("foot", "feet"), ("tooth", "teeth"), ("man", "men"),
            ("woman", "women"), ("goose", "geese"), ("person", "people"), ("knife", "knives"), ("leaf", "leaves")]
_PAST = [("go", "went"), ("eat", "ate"), ("see", "saw"), ("run", "ran"), ("write", "wrote"), ("take", "took"),
         ("give", "gave"), ("swim", "swam"), ("drink", "drank"), ("sing", "sang"), ("fly", "flew"), ("buy", "bought")]
_MISC = [
    ("On a clear day the color of the sky is", "blue"), ("The color of fresh grass is", "green"),
    ("The color of fresh snow is", "white"), ("Ripe bananas are", "yellow"), ("Frozen water is called", "ice"),
    ("A spider has eight", "legs"), ("There are seven days in a", "week"), ("The animal that says meow is the", "cat"),
    ("The planet we live on is called", "Earth"), ("The largest ocean on Earth is the", "Pacific"),
    ("Romeo and Juliet was written by William", "Shakespeare"), ("Bees make", "honey"),
    ("Water boils at 100 degrees", "Celsius"), ("The first man to walk on the Moon was Neil", "Armstrong"),
    ("The Statue of Liberty is in New", "York"), ("Albert Einstein developed the theory of", "relativity"),
    ("The tallest animal in the world is the", "giraffe"), ("The Great Wall is in", "China"),
    ("The chemical symbol for water is", "H"), ("A triangle has three", "sides"), ("A square has four", "sides"),
    ("The Sun rises in the", "east"), ("The Sun sets in the", "west"), ("There are twelve months in a", "year"),
    ("There are sixty minutes in an", "hour"), ("There are sixty seconds in a", "minute"),
    ("There are twenty-four hours in a", "day"), ("The largest planet in the solar system is", "Jupiter"),
    ("The planet closest to the Sun is", "Mercury"), ("The red planet is", "Mars"),
    ("The Earth orbits the", "Sun"), ("The Moon orbits the", "Earth"), ("Plants need sunlight to make their",
                                                                          "food"),
    ("The gas we breathe in to live is", "oxygen"), ("The longest river in Africa is the", "Nile"),
    ("The largest desert in Africa is the", "Sahara"), ("The highest mountain in the world is Mount", "Everest"),
    ("The Eiffel Tower is in", "Paris"), ("The Colosseum is in", "Rome"), ("Big Ben is in", "London"),
    ("The pyramids of Giza are in", "Egypt"), ("The Taj Mahal is in", "India"),
    ("The Mona Lisa was painted by Leonardo da", "Vinci"), ("The theory of evolution was proposed by Charles",
                                                           "Darwin"),
    ("The first president of the United States was George", "Washington"),
    ("Harry Potter was written by J. K.", "Rowling"), ("The author of Hamlet is William", "Shakespeare"),
    ("The Beatles came from the city of", "Liverpool"), ("A baby's first food is", "milk"),
    ("Cows give us", "milk"), ("Hens lay", "eggs"), ("Fish breathe through their", "gills"),
    ("Birds are covered in", "feathers"), ("A camel can live for a long time in the", "desert"),
    ("Penguins live in", "Antarctica"), ("The king of the jungle is the", "lion"),
    ("The fastest land animal is the", "cheetah"), ("The largest animal on Earth is the blue", "whale"),
    ("An animal that eats only plants is called a", "herbivore"), ("A doctor works in a", "hospital"),
    ("A teacher works in a", "school"), ("A chef works in a", "kitchen"), ("We read books in a", "library"),
    ("We see films at the", "cinema"), ("Letters are delivered by the", "post"),
    ("You write on a blackboard with", "chalk"), ("Clocks tell the", "time"), ("We cut paper with", "scissors"),
    ("Rain falls from the", "sky"), ("A rainbow has seven", "colors"), ("Lemons taste", "sour"),
    ("Sugar tastes", "sweet"), ("The freezing point of water is zero degrees", "Celsius"),
    ("Two plus two equals", "four"), ("Three plus three equals", "six"), ("Ten minus five equals", "five"),
    ("Humans have two eyes and one", "nose"), ("The heart pumps", "blood"), ("We hear with our", "ears"),
    ("We see with our", "eyes"), ("We smell with our", "nose"), ("The season after summer is", "autumn"),
    ("The season after spring is", "summer"), ("The coldest season of the year is", "winter"),
    ("Christmas is celebrated in the month of", "December"), ("The currency of Japan is the", "yen"),
    ("The currency of the United Kingdom is the pound", "sterling"), ("The currency of the United States is the",
                                                                     "dollar"),
    ("The Pacific and the Atlantic are", "oceans"), ("Mount Everest is in the", "Himalayas"),
    ("The capital city of the United Kingdom is", "London"), ("Football is played with a", "ball"),
    ("Tennis is played with a", "racket"), ("The Olympic Games are held every four", "years"),
]


def _old_questions() -> List[Tuple[str, str]]:
    pairs = [(f"The capital of {c} is", a) for c, a in _CAPITALS]
    pairs += [(f"The language spoken in {c} is", a) for c, a in _LANGUAGES]
    pairs += [(f"The opposite of {w} is", a) for w, a in _OPPOSITES]
    pairs += [(f"The day after {d} is", _DAYS[(i + 1) % 7]) for i, d in enumerate(_DAYS)]
    pairs += [(f"The month after {m} is", _MONTHS[(i + 1) % 12]) for i, m in enumerate(_MONTHS)]
    pairs += [(f"The number after {n} is", _NUMBERS[i + 1]) for i, n in enumerate(_NUMBERS[:-1])]
    pairs += [(f"A baby {a} is called a", y) for a, y in _YOUNG]
    pairs += [(f"The animal that says {s} is the", a) for s, a in _SOUNDS]
    pairs += [(f"The plural of {w} is", p) for w, p in _PLURALS]
    pairs += [(f"The past tense of {w} is", p) for w, p in _PAST]
    pairs += _MISC
    return [(p, " " + a) for p, a in dict.fromkeys(pairs)]


OLD_QUESTIONS = _old_questions()

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
