"""Generate the example multi-task datasets shipped with moea (deterministic, stdlib only).

Writes, relative to this folder:

- ``data/``: the easy demo mixture (``mixture.yaml``) — four clearly different tasks plus a small
  general-instruction replay set:

  ========================  =====  ===============  =============================================
  file                      rows   kind             what
  ========================  =====  ===============  =============================================
  ``sentiment.jsonl``       400    classification   short reviews → ``positive`` / ``negative``
  ``math.jsonl``            360    math             arithmetic word problems → ``a + b = c``
  ``extraction.csv``        320    extraction       a sentence about a person → compact JSON
  ``dates.jsonl``           300    generation       a date in prose → ISO 8601 ``YYYY-MM-DD``
  ``general.jsonl``         48     generation       generic Q&A (``replay: true``)
  ========================  =====  ===============  =============================================

- ``hard/``: a routing-evaluation mixture shaped like real work, with overlapping vocabulary —
  support-ticket triage vs. sentiment over the *same* customer messages, SQL generation vs. JSON
  extraction over the *same* customers/orders, instructions paraphrased (``hard/mixture.yaml``).
- ``ood_prompts.jsonl``: out-of-distribution prompts (chit-chat, other languages, unrelated
  questions) that a router should send to the base model.

Rows are ``{"prompt": str, "response": str}`` (CSV: header ``prompt,response``). Every response
stays short (≤ 24 SmolLM2 tokens) so a LoRA step is cheap. Prompts are unique within a task and
never shared between tasks of one mixture. Same seed → byte-identical files::

    python examples/make_dataset.py            # writes everything with seed 13
    python examples/make_dataset.py --check    # regenerate in memory, fail if the files differ
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import random
import sys
from collections.abc import Callable
from pathlib import Path

EXAMPLES_DIR = Path(__file__).resolve().parent
DEFAULT_SEED = 13

Row = dict[str, str]

# --------------------------------------------------------------------------------------------------
# Shared vocabularies
# --------------------------------------------------------------------------------------------------
# fmt: off
FIRST_NAMES = [
    "Maria", "Tom", "Aisha", "Lukas", "Chen", "Sofia", "Omar", "Emma", "Ravi", "Nina", "Jonas", "Fatima",
    "Pedro", "Hannah", "Kenji", "Lea", "Diego", "Olga", "Samuel", "Ines", "Marco", "Yara", "Felix", "Amara",
    "Ivan", "Clara", "Mateo", "Zoe", "Hugo", "Leila",
]
LAST_NAMES = [
    "Lopez", "Becker", "Khan", "Novak", "Wang", "Rossi", "Haddad", "Jensen", "Patel", "Berg", "Schmidt",
    "Costa", "Tanaka", "Dubois", "Silva", "Ivanova", "Moreau", "Okafor", "Fischer", "Weber",
]
CITIES = [
    "Berlin", "Lisbon", "Oslo", "Madrid", "Vienna", "Dublin", "Prague", "Warsaw", "Athens", "Helsinki",
    "Zurich", "Lyon", "Porto", "Krakow", "Milan", "Seville", "Bergen", "Ghent", "Riga", "Tallinn",
]
MONTHS = [
    "January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
    "November", "December",
]
DAYS_IN_MONTH = [
    31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31,
]
# fmt: on


def _pick(rng: random.Random, items: list[str]) -> str:
    return items[rng.randrange(len(items))]


def _ordinal(n: int) -> str:
    """1 → '1st', 2 → '2nd', 11 → '11th', 23 → '23rd'."""
    suffix = "th" if 11 <= n % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def collect_rows(
    rng: random.Random, make: Callable[[random.Random], Row], n: int, taken: set[str]
) -> list[Row]:
    """Draw rows from ``make`` until ``n`` have prompts unseen in ``taken`` (shared across tasks)."""
    rows: list[Row] = []
    attempts = 0
    while len(rows) < n:
        attempts += 1
        if attempts > n * 200:
            raise RuntimeError(f"generator {make.__name__} could not produce {n} unique prompts")
        row = make(rng)
        if row["prompt"] in taken:
            continue
        taken.add(row["prompt"])
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------------
# Easy mixture: sentiment
# --------------------------------------------------------------------------------------------------
SENTIMENT_DOMAINS: dict[str, dict[str, list[str]]] = {
    "restaurant": {
        "things": [
            "the pasta",
            "the soup",
            "the service",
            "the dessert",
            "the staff",
            "the curry",
            "the wine list",
        ],
        "item": ["restaurant", "bistro", "diner", "pizzeria"],
    },
    "hotel": {
        "things": [
            "the room",
            "the bed",
            "the breakfast",
            "the reception",
            "the view",
            "the shower",
            "the pool",
        ],
        "item": ["hotel", "hostel", "guesthouse", "resort"],
    },
    "gadget": {
        "things": ["the battery", "the screen", "the sound", "the camera", "the charger", "the keyboard"],
        "item": ["phone", "laptop", "headset", "tablet", "smartwatch", "speaker"],
    },
    "film": {
        "things": ["the plot", "the acting", "the soundtrack", "the ending", "the dialogue", "the pacing"],
        "item": ["movie", "film", "series", "documentary"],
    },
    "book": {
        "things": ["the story", "the characters", "the writing", "the last chapter", "the translation"],
        "item": ["novel", "book", "memoir", "cookbook"],
    },
    "app": {
        "things": ["the interface", "the sync", "the notifications", "the search", "the update", "the login"],
        "item": ["app", "game", "website", "tool"],
    },
}
# fmt: off
POSITIVE_ADJ = [
    "excellent", "wonderful", "superb", "delightful", "fantastic", "great", "lovely", "impressive",
    "brilliant", "outstanding", "flawless", "charming",
]
NEGATIVE_ADJ = [
    "terrible", "awful", "disappointing", "mediocre", "dreadful", "poor", "sloppy", "horrible", "broken",
    "useless", "bland", "frustrating",
]
POSITIVE_VERDICT = [
    "Highly recommended.", "Would buy again.", "I will be back.", "Five stars from me.",
    "Worth every cent.", "Loved it.", "Best purchase this year.", "Can't wait to try it again.",
]
NEGATIVE_VERDICT = [
    "Avoid it.", "Never again.", "Total waste of money.", "One star.", "I want a refund.", "Not worth it.",
    "Deeply regret it.", "Stay away.",
]
# fmt: on
SENTIMENT_INSTRUCTIONS = [
    "Classify the sentiment of this review as positive or negative.\n\n{text}",
    "Is the following review positive or negative?\n{text}",
    "Review: {text}\nSentiment:",
    "What is the sentiment (positive/negative) of this customer review? {text}",
    "Label the review with one word, positive or negative: {text}",
    "{text}\n\nWas the reviewer happy (positive) or unhappy (negative)?",
    "Sentiment analysis. Text: {text}",
    'Tell me if this opinion is positive or negative: "{text}"',
]


def _review(rng: random.Random, positive: bool) -> str:
    domain = SENTIMENT_DOMAINS[_pick(rng, sorted(SENTIMENT_DOMAINS))]
    item, thing, other = (
        _pick(rng, domain["item"]),
        _pick(rng, domain["things"]),
        _pick(rng, domain["things"]),
    )
    good, bad = _pick(rng, POSITIVE_ADJ), _pick(rng, NEGATIVE_ADJ)
    adj = good if positive else bad
    verdict = _pick(rng, POSITIVE_VERDICT if positive else NEGATIVE_VERDICT)
    # Contrast templates put the opposite word first so a bag-of-words shortcut is not enough.
    templates = [
        f"{thing.capitalize()} was {adj}. {verdict}",
        f"This {item} is {adj}; {other} in particular was {_pick(rng, POSITIVE_ADJ if positive else NEGATIVE_ADJ)}.",
        f"I expected a {bad if positive else good} {item}, but {thing} turned out {adj}. {verdict}",
        f"Honestly, {thing} of this {item} was {adj}.",
        f"{verdict} {thing.capitalize()} and {other} were both {adj}.",
        f"Bought this {item} last week: {thing} is {adj}.",
        f"At first {thing} seemed {bad if positive else good}, yet overall the {item} felt {adj}.",
        f"My friends said the {item} was {bad if positive else good}. They were wrong, it is {adj}."
        if positive
        else f"My friends said the {item} was {good}. They were wrong, it is {adj}.",
    ]
    return _pick(rng, templates)


def make_sentiment(rng: random.Random) -> Row:
    positive = rng.random() < 0.5
    text = _review(rng, positive)
    return {
        "prompt": _pick(rng, SENTIMENT_INSTRUCTIONS).format(text=text),
        "response": "positive" if positive else "negative",
        "input": text,
    }


# --------------------------------------------------------------------------------------------------
# Easy mixture: math word problems (answer = the final number)
# --------------------------------------------------------------------------------------------------
# fmt: off
MATH_ITEMS = [
    ("apple", "apples"), ("marble", "marbles"), ("book", "books"), ("stamp", "stamps"),
    ("pencil", "pencils"), ("cookie", "cookies"), ("ticket", "tickets"), ("sticker", "stickers"),
    ("orange", "oranges"), ("coin", "coins"), ("card", "cards"), ("shell", "shells"),
]
PRONOUNS = {
    "Maria": "She", "Aisha": "She", "Sofia": "She", "Emma": "She", "Nina": "She", "Fatima": "She",
    "Hannah": "She", "Lea": "She", "Olga": "She", "Ines": "She", "Yara": "She", "Amara": "She",
    "Clara": "She", "Zoe": "She", "Leila": "She",
}
# fmt: on


def _math_problem(rng: random.Random) -> tuple[str, str]:
    name, friend = rng.sample(FIRST_NAMES, 2)
    pronoun = PRONOUNS.get(name, "He")
    one, many = _pick(rng, MATH_ITEMS)
    kind = rng.randrange(7)
    if kind == 0:
        a, b = rng.randint(3, 60), rng.randint(2, 40)
        return (
            f"{name} has {a} {many}. {pronoun} gets {b} more from {friend}. How many {many} does {name} have now?",
            f"{a} + {b} = {a + b}",
        )
    if kind == 1:
        a = rng.randint(10, 80)
        b = rng.randint(2, a - 1)
        return (
            f"{name} had {a} {many} and gave {b} of them to {friend}. How many {many} are left?",
            f"{a} - {b} = {a - b}",
        )
    if kind == 2:
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        return (f"A box holds {a} {many}. How many {many} are in {b} boxes?", f"{a} * {b} = {a * b}")
    if kind == 3:
        b, k = rng.randint(2, 9), rng.randint(2, 12)
        return (
            f"{b * k} {many} are shared equally among {b} children. How many {many} does each child get?",
            f"{b * k} / {b} = {k}",
        )
    if kind == 4:
        a, b = rng.randint(2, 9), rng.randint(2, 12)
        c = rng.randint(1, a * b - 1)
        return (
            f"{name} buys {a} packs with {b} {many} in each pack and loses {c}. How many {many} remain?",
            f"{a} * {b} = {a * b}; {a * b} - {c} = {a * b - c}",
        )
    if kind == 5:
        price, qty = rng.randint(2, 25), rng.randint(2, 9)
        return (
            f"One {one} costs {price} dollars. What do {qty} {many} cost in dollars?",
            f"{price} * {qty} = {price * qty}",
        )
    a, b, c = rng.randint(5, 40), rng.randint(5, 40), rng.randint(5, 40)
    return (
        f"On Monday {name} collected {a} {many}, on Tuesday {b} and on Wednesday {c}. How many in total?",
        f"{a} + {b} + {c} = {a + b + c}",
    )


MATH_INSTRUCTIONS = [
    "{q}",
    "Solve: {q}",
    "Math problem: {q}",
    "{q} Give the final number.",
    "Question: {q}\nAnswer:",
    "Work out the answer. {q}",
]


def make_math(rng: random.Random) -> Row:
    question, answer = _math_problem(rng)
    return {"prompt": _pick(rng, MATH_INSTRUCTIONS).format(q=question), "response": answer, "input": question}


# --------------------------------------------------------------------------------------------------
# Easy mixture: structured extraction (text → compact JSON)
# --------------------------------------------------------------------------------------------------
# fmt: off
JOBS = [
    "baker", "nurse", "pilot", "teacher", "chemist", "carpenter", "lawyer", "designer", "farmer", "editor",
]
# fmt: on
EXTRACTION_INSTRUCTIONS = [
    "Extract name, age and city as JSON.\n{text}",
    "Return a JSON object with the keys name, age, city for: {text}",
    "Text: {text}\nJSON:",
    "Parse the person in this sentence into JSON (name, age, city): {text}",
    "Convert to a compact JSON record: {text}",
    "{text}\nExtract the fields name/age/city as JSON.",
]


def make_extraction(rng: random.Random) -> Row:
    name = f"{_pick(rng, FIRST_NAMES)} {_pick(rng, LAST_NAMES)}"
    age, city, job = rng.randint(19, 78), _pick(rng, CITIES), _pick(rng, JOBS)
    templates = [
        f"{name} is {age} years old and lives in {city}.",
        f"Meet {name} ({age}), a {job} from {city}.",
        f"{city} resident {name}, aged {age}, works as a {job}.",
        f"Name: {name}; Age: {age}; Location: {city}",
        f"Our new {job}, {name}, moved to {city} at the age of {age}.",
        f"At {age}, {name} still runs every morning in {city}.",
        f"{name}, {age}, {city}",
        f"The {job} {name} celebrated turning {age} last week in {city}.",
    ]
    record = {"name": name, "age": age, "city": city}
    instruction = _pick(rng, EXTRACTION_INSTRUCTIONS)  # drawn before the sentence: keeps the files stable
    text = _pick(rng, templates)
    return {
        "prompt": instruction.format(text=text),
        "response": json.dumps(record, separators=(",", ":")),
        "input": text,
    }


# --------------------------------------------------------------------------------------------------
# Easy mixture: date normalisation (rewriting → ISO 8601)
# --------------------------------------------------------------------------------------------------
DATE_SENTENCES = [
    "The invoice is due on {d}.",
    "We met on {d}.",
    "Her flight leaves {d}.",
    "The contract ends {d}.",
    "Delivery is planned for {d}.",
    "He was born on {d}.",
    "The store reopens on {d}.",
    "Registration closes {d}.",
    "{d}",
    "The concert was moved to {d}.",
]
DATE_INSTRUCTIONS = [
    "Rewrite the date in ISO format (YYYY-MM-DD): {s}",
    "Normalize the date to YYYY-MM-DD.\n{s}",
    "Convert the date in this sentence to ISO 8601: {s}",
    "{s}\nWhat is this date in YYYY-MM-DD form?",
    "Date normalisation: {s}",
]


def make_date(rng: random.Random) -> Row:
    year, month = rng.randint(1985, 2035), rng.randint(1, 12)
    day = rng.randint(1, DAYS_IN_MONTH[month - 1])
    name = MONTHS[month - 1]
    forms = [
        f"{name} {day}, {year}",
        f"{day} {name} {year}",
        f"the {_ordinal(day)} of {name}, {year}",
        f"{name[:3]} {day} {year}",
        f"{name} the {_ordinal(day)}, {year}",
        f"{day}. {name} {year}",
        f"{_ordinal(day)} {name[:3]}. {year}",
    ]
    sentence = _pick(rng, DATE_SENTENCES).format(d=_pick(rng, forms))
    return {
        "prompt": _pick(rng, DATE_INSTRUCTIONS).format(s=sentence),
        "input": sentence,
        "response": f"{year:04d}-{month:02d}-{day:02d}",
    }


# --------------------------------------------------------------------------------------------------
# Replay: general instructions (hand-written, short answers)
# --------------------------------------------------------------------------------------------------
GENERAL_QA: list[tuple[str, str]] = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is the capital of Japan?", "Tokyo is the capital of Japan."),
    ("How many days are in a week?", "A week has seven days."),
    ("What color is the sky on a clear day?", "On a clear day the sky is blue."),
    ("Name a fruit that is yellow.", "A banana is a yellow fruit."),
    ("What do bees make?", "Bees make honey."),
    ("Who wrote Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet."),
    ("What is the largest planet in our solar system?", "Jupiter is the largest planet."),
    ("What is the boiling point of water in Celsius?", "Water boils at 100 degrees Celsius at sea level."),
    ("Say hello in a friendly way.", "Hello there! Nice to meet you."),
    ("Give me a synonym for happy.", "A synonym for happy is cheerful."),
    ("What is the opposite of cold?", "The opposite of cold is hot."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What language is spoken in Brazil?", "Portuguese is spoken in Brazil."),
    ("Suggest a name for a pet cat.", "How about Whiskers?"),
    ("What gas do plants absorb from the air?", "Plants absorb carbon dioxide."),
    ("Which ocean is the largest?", "The Pacific Ocean is the largest."),
    ("What is H2O commonly called?", "H2O is water."),
    ("Write a short greeting for a birthday card.", "Happy birthday! Wishing you a wonderful year."),
    ("What instrument has black and white keys?", "A piano has black and white keys."),
    ("How many continents are there?", "There are seven continents."),
    ("What is the freezing point of water in Fahrenheit?", "Water freezes at 32 degrees Fahrenheit."),
    ("Give one tip for better sleep.", "Keep a regular bedtime every night."),
    ("What does a thermometer measure?", "A thermometer measures temperature."),
    ("Which animal is known as the king of the jungle?", "The lion is called the king of the jungle."),
    ("Recommend a healthy breakfast.", "Oatmeal with fruit is a healthy breakfast."),
    ("What is the tallest mountain on Earth?", "Mount Everest is the tallest mountain."),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci painted the Mona Lisa."),
    ("What is the main ingredient of guacamole?", "Guacamole is made mainly from avocado."),
    ("Explain what a verb is in one sentence.", "A verb is a word that describes an action."),
    ("What season comes after winter?", "Spring comes after winter."),
    ("How many hours are in a day?", "A day has 24 hours."),
    ("What is the chemical symbol for gold?", "The chemical symbol for gold is Au."),
    ("Name a primary color.", "Red is a primary color."),
    ("What do you call a baby dog?", "A baby dog is called a puppy."),
    ("Give me a polite way to decline an invitation.", "Thank you so much, but I can't make it."),
    ("What is the square root of 81?", "The square root of 81 is 9."),
    ("What is the closest star to Earth?", "The Sun is the closest star to Earth."),
    ("Which organ pumps blood through the body?", "The heart pumps blood through the body."),
    ("What is a haiku?", "A haiku is a short three-line Japanese poem."),
    ("Tell me a fun fact about octopuses.", "Octopuses have three hearts."),
    ("What is the currency of the United Kingdom?", "The UK uses the pound sterling."),
    ("What do caterpillars turn into?", "Caterpillars turn into butterflies or moths."),
    ("How do you say thank you in Spanish?", "Thank you in Spanish is gracias."),
    ("What is the longest river in Africa?", "The Nile is the longest river in Africa."),
    ("Why do we need sleep?", "Sleep lets the body and brain rest and recover."),
    ("Suggest a weekend activity.", "Go for a walk in a park with a friend."),
    ("What is the first letter of the English alphabet?", "The first letter is A."),
]


def general_rows() -> list[Row]:
    """The hand-written replay rows, in a fixed order."""
    return [{"prompt": q, "response": a} for q, a in GENERAL_QA]


# --------------------------------------------------------------------------------------------------
# Hard mixture: shared customer-service world
# --------------------------------------------------------------------------------------------------
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
GADGETS = ["router", "smart speaker", "monitor", "drone", "robot vacuum", "e-reader", "webcam"]
# fmt: off
PRODUCTS = [
    "blender", "desk lamp", "router", "backpack", "coffee grinder", "monitor", "kettle", "drone",
    "running shoes", "vacuum",
]
# fmt: on

# (team, negative message, positive message): the same subject matter carries both a triage team
# and a sentiment, so the two tasks share their vocabulary and the router must read the instruction.
TICKET_TEMPLATES: list[tuple[str, str, str]] = [
    (
        "billing",
        "I was charged twice for order #{order} ({product}). Please fix this now.",
        "The refund for order #{order} ({product}) arrived in two days, thank you so much!",
    ),
    (
        "billing",
        "My invoice for the {product} shows {amount} euros instead of the price I paid.",
        "Thanks for correcting the invoice for my {product} so quickly, {amount} euros is right.",
    ),
    (
        "billing",
        "Why did my card get billed {amount} euros for a {product} I cancelled?",
        "Got my {amount} euros back for the cancelled {product}. Smooth and painless.",
    ),
    (
        "technical",
        "The {gadget} keeps disconnecting from wifi every ten minutes. Useless.",
        "The firmware update fixed my {gadget}, it has not dropped the connection since. Great job.",
    ),
    (
        "technical",
        "Your app crashes whenever I try to pair my {gadget}.",
        "Pairing my {gadget} with the app worked on the first try, impressive.",
    ),
    (
        "technical",
        "After the update my {gadget} will not turn on at all.",
        "Your troubleshooting guide got my {gadget} running again in minutes, brilliant.",
    ),
    (
        "account",
        "I cannot log in to my account since {weekday} and the reset email never comes.",
        "Password reset worked instantly on {weekday}, I am back in my account. Lovely support.",
    ),
    (
        "account",
        "Someone changed the email on my account on {weekday}, I am locked out and worried.",
        "Thanks for helping me merge my two accounts, {name} on your team was wonderful.",
    ),
    (
        "account",
        "Please close the account of {name}, your privacy settings are a mess.",
        "Moving {name} to the family plan on my account was easy, really appreciate it.",
    ),
    (
        "shipping",
        "Order #{order} was supposed to arrive in {city} a week ago. Where is my {product}?",
        "My {product} arrived in {city} a day early, well packed. Excellent!",
    ),
    (
        "shipping",
        "The courier left my {product} in the rain in {city}, the box was soaked.",
        "The courier in {city} was friendly and the {product} arrived in perfect shape.",
    ),
    (
        "shipping",
        "Tracking for order #{order} has not moved in six days.",
        "Tracking for order #{order} was accurate to the hour, very happy with delivery.",
    ),
]
TRIAGE_INSTRUCTIONS = [
    "Route this support ticket to a team (billing, technical, account, shipping):\n{msg}",
    "Which department should handle this message? Answer billing, technical, account or shipping.\n{msg}",
    "Ticket: {msg}\nQueue:",
    "Assign a category to the customer email below.\n{msg}",
    "{msg}\n\nWhich support queue does this belong in?",
    "Triage: {msg}",
    'Customer wrote: "{msg}" Which team owns this?',
]
TONE_INSTRUCTIONS = [
    "Is the customer happy or unhappy? Answer positive or negative.\n{msg}",
    "What is the tone of this customer message (positive/negative)?\n{msg}",
    "Message: {msg}\nSentiment:",
    "{msg}\n\nDoes this customer sound satisfied? Reply positive or negative.",
    "Rate the mood of the following email as positive or negative: {msg}",
    'Customer wrote: "{msg}" How do they feel?',
    "Sentiment check: {msg}",
]


def _ticket(rng: random.Random) -> tuple[str, bool, str]:
    """A customer message: (team, is_positive, text)."""
    team, negative, positive = TICKET_TEMPLATES[rng.randrange(len(TICKET_TEMPLATES))]
    is_positive = rng.random() < 0.5
    text = (positive if is_positive else negative).format(
        order=rng.randint(1000, 9999),
        product=_pick(rng, PRODUCTS),
        gadget=_pick(rng, GADGETS),
        amount=rng.randint(9, 450),
        city=_pick(rng, CITIES),
        name=_pick(rng, FIRST_NAMES),
        weekday=_pick(rng, WEEKDAYS),
    )
    return team, is_positive, text


def make_triage(rng: random.Random) -> Row:
    team, _, text = _ticket(rng)
    return {"prompt": _pick(rng, TRIAGE_INSTRUCTIONS).format(msg=text), "response": team, "input": text}


def make_tone(rng: random.Random) -> Row:
    _, is_positive, text = _ticket(rng)
    return {
        "prompt": _pick(rng, TONE_INSTRUCTIONS).format(msg=text),
        "input": text,
        "response": "positive" if is_positive else "negative",
    }


def _customer(rng: random.Random) -> tuple[str, int, str, int, int]:
    """(name, age, city, order_id, amount) of one customer order."""
    return (
        f"{_pick(rng, FIRST_NAMES)} {_pick(rng, LAST_NAMES)}",
        rng.randint(19, 78),
        _pick(rng, CITIES),
        rng.randint(1000, 9999),
        rng.randint(5, 900),
    )


SQL_INSTRUCTIONS = [
    "Write a SQL query for {q}.",
    "Tables: customers(name, age, city), orders(id, customer, city, amount). Query: {q}",
    "Show me {q}.",
    "SQL please: {q}",
    "I need a query that returns {q}.",
    "Translate to SQL: {q}",
    "From the customers/orders database, get {q}.",
]
RECORD_INSTRUCTIONS = [
    "Extract the fields as JSON: {text}",
    "Turn this into a record: {text}",
    "{text}\nGive me the structured data.",
    "Parse into JSON: {text}",
    "Fill the customer database entry from this note: {text}",
    "Note: {text}\nRecord:",
]


def make_sql(rng: random.Random) -> Row:
    name, age, city, order, amount = _customer(rng)
    kind = rng.randrange(6)
    if kind == 0:
        question, sql = (
            f"customers from {city} older than {age}",
            f"SELECT name FROM customers WHERE city = '{city}' AND age > {age};",
        )
    elif kind == 1:
        question, sql = (
            f"how many orders {name} placed",
            f"SELECT COUNT(*) FROM orders WHERE customer = '{name}';",
        )
    elif kind == 2:
        question, sql = (
            f"the total amount of orders shipped to {city}",
            f"SELECT SUM(amount) FROM orders WHERE city = '{city}';",
        )
    elif kind == 3:
        question, sql = (
            f"the customer and city of order #{order}",
            f"SELECT customer, city FROM orders WHERE id = {order};",
        )
    elif kind == 4:
        question, sql = (
            f"orders above {amount} euros from {city}",
            f"SELECT id FROM orders WHERE amount > {amount} AND city = '{city}';",
        )
    else:
        question, sql = (f"the age of {name}", f"SELECT age FROM customers WHERE name = '{name}';")
    return {"prompt": _pick(rng, SQL_INSTRUCTIONS).format(q=question), "response": sql, "input": question}


def make_record(rng: random.Random) -> Row:
    name, age, city, order, amount = _customer(rng)
    kind = rng.randrange(4)
    if kind == 0:
        text, record = (
            f"{name} from {city} placed order #{order} for {amount} euros.",
            {"customer": name, "city": city, "amount": amount},
        )
    elif kind == 1:
        text, record = (
            f"Order #{order}: {amount} euros, customer {name}, ships to {city}.",
            {"order": order, "customer": name, "amount": amount},
        )
    elif kind == 2:
        text, record = (
            f"New customer {name}, {age}, registered in {city}.",
            {"name": name, "age": age, "city": city},
        )
    else:
        text, record = (
            f"{name} ({age}) paid {amount} euros for an order from {city}.",
            {"name": name, "age": age, "amount": amount},
        )
    return {
        "prompt": _pick(rng, RECORD_INSTRUCTIONS).format(text=text),
        "response": json.dumps(record, separators=(",", ":")),
        "input": text,
    }


# --------------------------------------------------------------------------------------------------
# Out-of-distribution prompts (→ base model). Held out: none of them is in moe_adapters/ood_prompts.py,
# the list the router trains its out-of-scope class on.
# --------------------------------------------------------------------------------------------------
OOD_PROMPTS: list[tuple[str, str]] = [
    ("chitchat", "Yo, long time no see!"),
    ("chitchat", "Good morning, any plans for the weekend?"),
    ("chitchat", "I'm bored. Tell me a joke."),
    ("chitchat", "What's your favourite colour?"),
    ("chitchat", "Can you keep me company for a bit?"),
    ("chitchat", "Thanks for your help earlier!"),
    ("chitchat", "Do you ever dream?"),
    ("chitchat", "I just got a new puppy, any name ideas?"),
    ("chitchat", "It's raining again here. Ugh."),
    ("chitchat", "What should I cook for dinner tonight?"),
    ("chitchat", "Write me a short poem about the sea."),
    ("chitchat", "Who are you?"),
    ("chitchat", "Can you recommend a good podcast?"),
    ("chitchat", "I feel a bit nervous about my exam tomorrow."),
    ("chitchat", "Surprise me with a random thought."),
    ("foreign", "Was machst du am Wochenende?"),
    ("foreign", "Ich freue mich auf den Urlaub am Meer."),
    ("foreign", "¿Cuál es la capital de Australia?"),
    ("foreign", "¿Me puedes contar un chiste?"),
    ("foreign", "Quelle est la meilleure saison pour visiter Paris ?"),
    ("foreign", "Comment vas-tu aujourd'hui ?"),
    ("foreign", "Qual è il tuo film preferito?"),
    ("foreign", "Hoe laat gaat de supermarkt open?"),
    ("foreign", "Dziękuję za pomoc, miłego dnia!"),
    ("foreign", "Você gosta de futebol?"),
    ("foreign", "今日の天気はどうですか？"),
    ("foreign", "你最喜欢的动物是什么？"),
    ("foreign", "Привет! Что нового?"),
    ("foreign", "Kahve mi çay mı tercih edersin?"),
    ("foreign", "Hej, vad heter du?"),
    ("general", "Explain how a rainbow forms."),
    ("general", "What is the difference between a virus and a bacterium?"),
    ("general", "Write a Python function that reverses a list."),
    ("general", "Why is the ocean salty?"),
    ("general", "Summarize the plot of Hamlet in two sentences."),
    ("general", "How does a refrigerator keep food cold?"),
    ("general", "Give me three tips for learning a new language."),
    ("general", "What caused the fall of the Roman Empire?"),
    ("general", "Why do cats purr?"),
    ("general", "Explain recursion to a child."),
    ("general", "What is the speed of light?"),
    ("general", "List some benefits of regular exercise."),
    ("general", "How do I keep basil alive indoors?"),
    ("general", "What is photosynthesis?"),
    ("general", "Describe the water cycle."),
    ("general", "Who was Ada Lovelace?"),
    ("general", "What is a black hole?"),
    ("general", "How do vaccines work?"),
    ("general", "Suggest a name for a bakery."),
    ("general", "Where does the word 'quarantine' come from?"),
    ("general", "Compose a haiku about autumn leaves."),
    ("general", "How many players are on a football team?"),
    ("general", "Explain what inflation is in simple terms."),
    ("general", "What are the planets in our solar system?"),
    ("general", "How do I make a paper airplane?"),
    ("general", "Translate 'good night' into German."),
    ("general", "Write a limerick about a sleepy owl."),
    ("general", "What is the tallest building in the world?"),
    ("general", "Say something encouraging before my run."),
    ("general", "What is machine learning?"),
]


# --------------------------------------------------------------------------------------------------
# Wordings. Unseen: instructions that no training row of any mixture uses (not in the *_INSTRUCTIONS
# lists above, nor in the extra templates below); each task's ``unseen_test_file`` wraps fresh inputs
# (not in any training row) in them, for `moea eval`'s robustness section. Extra templates: more
# training wordings for the hard set's templated variant (``hard/mixture_templates.yaml``).
# --------------------------------------------------------------------------------------------------
UNSEEN_ROWS_PER_TASK = 40
UNSEEN_WORDINGS: dict[str, list[str]] = {
    "sentiment": [
        "Did the writer like it? Answer positive or negative.\n{input}",
        "{input}\n\nthumbs up or thumbs down?",
        "Here's a review I found: {input} Overall verdict?",
        "Decide whether this opinion is favourable or unfavourable: {input}",
        "How does the reviewer feel about it? {input}",
    ],
    "math": [
        "Can you help my kid with this one? {input}",
        "{input} Please calculate it.",
        "Here is a word problem from homework: {input}",
        "Figure this out for me: {input}",
        "Compute the result. {input}",
    ],
    "extraction": [
        "Pull out the person's name, age and city from this text and give JSON: {input}",
        "{input}\n\nstructured version please (name/age/city)",
        "Who is described here? Reply with a JSON object. {input}",
        "Make a JSON profile out of: {input}",
        "Grab name, age and city: {input}",
    ],
    "dates": [
        "What's this date in ISO form? {input}",
        "{input}\n\nFormat that date as year-month-day.",
        "Please standardise the date mentioned here: {input}",
        "Give me the YYYY-MM-DD for: {input}",
        "When is this, written the ISO way? {input}",
    ],
    "triage": [
        "hey, which of our teams should I forward this one to?\n\n{input}",
        "{input}\n\n(forwarding to the right desk: billing, technical, account or shipping?)",
        "Please figure out which group handles this complaint: {input}",
        "Email from a client below. What kind of issue is it (billing / technical / account / shipping)?\n{input}",
        "Dispatch this request to the correct department.\n{input}",
        "{input}\nWhose job is this?",
    ],
    "tone": [
        "quick one: is this person angry or pleased with us?\n\n{input}",
        "{input}\n\nWould you say the writer is content or upset? (positive/negative)",
        "Gauge the customer's attitude in this email: {input}",
        "How satisfied does this client seem? Say positive or negative.\n{input}",
        "Detect the feeling behind this feedback: {input}",
        "{input}\nGood vibes or bad vibes?",
    ],
    "sql": [
        "Can you pull {input} from our db?",
        "Need a quick select statement: {input}",
        "What SQL would list {input}?",
        "{input}: write the query for me.",
        "Against the customers and orders tables, fetch {input}.",
        "Help me retrieve {input} with a query.",
    ],
    "records": [
        "Can you turn this CRM note into JSON for me? {input}",
        "{input}\n\njson version?",
        "Capture the details of this order note as key/value JSON: {input}",
        "I need this as machine-readable data: {input}",
        "Log this in structured form.\n{input}",
        "Serialize the facts in this sentence: {input}",
    ],
}
EXTRA_TEMPLATES: dict[str, list[str]] = {
    "triage": [
        "Support inbox item:\n{input}\n\nPick the owning team: billing, technical, account or shipping.",
        "Classify this ticket by team. {input}",
        "Who should pick this up, billing, technical, account or shipping? {input}",
        "New ticket in the helpdesk: {input}\nResponsible team:",
        "Sort the following message into the right support queue.\n\n{input}",
    ],
    "tone": [
        "Classify the sentiment of this support message.\n{input}",
        "Was this customer pleased or annoyed? positive/negative\n{input}",
        "{input}\nTone (positive or negative):",
        "Read the customer's note and say if the sentiment is positive or negative. {input}",
        "Emotion of the writer, positive or negative? {input}",
    ],
    "sql": [
        "Give me the SQLite statement for {input}.",
        "Query the database for {input}.",
        "Compose a SELECT that finds {input}.",
        "Database question: {input}",
        "How would I look up {input} in SQL?",
    ],
    "records": [
        "Convert this note to a JSON object: {input}",
        "{input}\nAs JSON, please.",
        "Pull the structured fields out of this text. {input}",
        "Make a data entry for: {input}",
        "Structured record for the following note.\n{input}",
    ],
}
# Each task's shipped instructions and the name of their placeholder.
TRAINING_WORDINGS: dict[str, tuple[list[str], str]] = {
    "sentiment": (SENTIMENT_INSTRUCTIONS, "text"),
    "math": (MATH_INSTRUCTIONS, "q"),
    "extraction": (EXTRACTION_INSTRUCTIONS, "text"),
    "dates": (DATE_INSTRUCTIONS, "s"),
    "triage": (TRIAGE_INSTRUCTIONS, "msg"),
    "tone": (TONE_INSTRUCTIONS, "msg"),
    "sql": (SQL_INSTRUCTIONS, "q"),
    "records": (RECORD_INSTRUCTIONS, "text"),
}


def training_templates(task: str, extra: bool = False) -> list[str]:
    """A task's shipped instructions as ``{input}`` templates (plus the extra ones with ``extra``)."""
    wordings, name = TRAINING_WORDINGS[task]
    shipped = [w.replace("{" + name + "}", "{input}") for w in wordings]
    return shipped + (EXTRA_TEMPLATES.get(task, []) if extra else [])


def unseen_rows(
    rng: random.Random, task: str, make: Callable[[random.Random], Row], n: int, seen_inputs: set[str]
) -> list[Row]:
    """``n`` rows with fresh inputs (not in ``seen_inputs``) worded with the task's unseen instructions."""
    rows: list[Row] = []
    prompts: set[str] = set()
    for _ in range(n * 200):
        if len(rows) == n:
            return rows
        row = make(rng)
        if row["input"] in seen_inputs:
            continue
        prompt = _pick(rng, UNSEEN_WORDINGS[task]).replace("{input}", row["input"])
        if prompt not in prompts:
            prompts.add(prompt)
            rows.append({"prompt": prompt, "response": row["response"]})
    if len(rows) < n:
        raise RuntimeError(f"{task}: could not produce {n} unseen rows with fresh inputs")
    return rows


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------
def _jsonl(rows: list[dict[str, str]]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def read_csv_rows(text: str) -> list[Row]:
    """Rows of a CSV text with a ``prompt,response`` header (the inverse of the CSV writer)."""
    return list(csv.DictReader(io.StringIO(text)))


def _csv(rows: list[Row]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["prompt", "response"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _yaml_list(header: str, items: list[str]) -> str:
    """A YAML list of strings (JSON string syntax is valid YAML; stdlib only)."""
    return header + "".join(f"- {json.dumps(item, ensure_ascii=False)}\n" for item in items)


def _prompt_rows(rows: list[Row]) -> list[Row]:
    return [{"prompt": r["prompt"], "response": r["response"]} for r in rows]


def _raw_rows(rows: list[Row]) -> list[Row]:
    """Raw-input rows for a templated task, first occurrence of each input. The column is ``prompt`` (the
    default ``prompt_field``) so the task's ``unseen_test_file``, whose prompts are worded already, shares
    the column name with the hard set's."""
    seen: dict[str, Row] = {}
    for row in rows:
        seen.setdefault(row["input"], {"prompt": row["input"], "response": row["response"]})
    return list(seen.values())


def build_files(seed: int = DEFAULT_SEED) -> dict[str, str]:
    """Every generated file as ``{path relative to examples/: text}`` — same seed, same text."""
    files: dict[str, str] = {}
    # One RNG per task keeps a task's rows stable when another task's generator changes.
    easy_taken: set[str] = set()
    easy = [
        ("sentiment", make_sentiment, 400),
        ("math", make_math, 360),
        ("extraction", make_extraction, 320),
        ("dates", make_date, 300),
    ]
    easy_taken.update(q for q, _ in GENERAL_QA)
    easy_rows = {}
    for offset, (task, make, n) in enumerate(easy):
        rows = easy_rows[task] = collect_rows(random.Random(seed * 1000 + offset), make, n, easy_taken)
        files[f"data/{task}.csv" if task == "extraction" else f"data/{task}.jsonl"] = (
            _csv(_prompt_rows(rows)) if task == "extraction" else _jsonl(_prompt_rows(rows))
        )
    files["data/general.jsonl"] = _jsonl(general_rows())

    hard_taken: set[str] = set()
    hard = [
        ("triage", make_triage, 360),
        ("tone", make_tone, 320),
        ("sql", make_sql, 340),
        ("records", make_record, 300),
    ]
    hard_rows = {}
    for offset, (task, make, n) in enumerate(hard):
        rows = hard_rows[task] = collect_rows(random.Random(seed * 1000 + 100 + offset), make, n, hard_taken)
        files[f"hard/data/{task}.jsonl"] = _jsonl(_prompt_rows(rows))

    files["ood_prompts.jsonl"] = _jsonl([{"prompt": p, "category": c} for c, p in OOD_PROMPTS])
    files.update(_wording_files(seed, easy, easy_rows, hard, hard_rows))
    return files


def _wording_files(
    seed: int,
    easy: list[tuple[str, Callable[[random.Random], Row], int]],
    easy_rows: dict[str, list[Row]],
    hard: list[tuple[str, Callable[[random.Random], Row], int]],
    hard_rows: dict[str, list[Row]],
) -> dict[str, str]:
    """Unseen-wording test files of both mixtures and the hard set's templated variant (raw inputs +
    templates). Inputs of any training row of a mixture are never reused in its unseen rows."""
    files: dict[str, str] = {}
    for prefix, specs, rows_by_task, base in (("", easy, easy_rows, 500), ("hard/", hard, hard_rows, 600)):
        seen = {r["input"] for rows in rows_by_task.values() for r in rows}
        for offset, (task, make, _) in enumerate(specs):
            rng = random.Random(seed * 1000 + base + offset)
            rows = unseen_rows(rng, task, make, UNSEEN_ROWS_PER_TASK, seen)
            files[f"{prefix}data/unseen/{task}.jsonl"] = _jsonl(rows)
    for task, _, _ in hard:
        files[f"hard/data/raw/{task}.jsonl"] = _jsonl(_raw_rows(hard_rows[task]))
        header = (
            f"# Training wordings of the hard set's {task} task ({{input}} = the raw input), used by\n"
            "# hard/mixture_templates.yaml. Generated by examples/make_dataset.py.\n"
        )
        files[f"hard/templates/{task}.yaml"] = _yaml_list(header, training_templates(task, extra=True))
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="RNG seed (default %(default)s).")
    parser.add_argument(
        "--out", type=Path, default=EXAMPLES_DIR, help="Folder to write into (default: examples/)."
    )
    parser.add_argument("--check", action="store_true", help="Do not write; exit 1 if files on disk differ.")
    args = parser.parse_args(argv)

    files = build_files(args.seed)
    stale = [
        rel
        for rel, text in files.items()
        if not (args.out / rel).is_file() or (args.out / rel).read_text(encoding="utf-8") != text
    ]
    if args.check:
        if stale:
            print(f"out of date: {', '.join(stale)}; run `python examples/make_dataset.py`", file=sys.stderr)
            return 1
        print(f"{len(files)} files up to date")
        return 0
    for rel, text in files.items():
        path = args.out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        if rel.endswith(".csv"):
            rows = len(read_csv_rows(text))
        else:
            rows = text.count("\n- ") + text.startswith("- ") if rel.endswith(".yaml") else text.count("\n")
        print(f"wrote {path} ({rows} rows)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
