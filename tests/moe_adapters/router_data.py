"""Task prompts and a held-out out-of-scope set for the router tests.

The task prompts are generated from varied templates (several phrasings per task, random fillers) so
that a router cannot win by matching one fixed prefix. The held-out OOD prompts share nothing with
`moe_adapters.ood_prompts` (the product's calibration set): they test generalisation, not memory.
"""

from __future__ import annotations

import random

_NAMES = ["Tom", "Ana", "Li", "Omar", "Sara", "Jonas", "Priya", "Kenji", "Maria", "Ben"]
_ITEMS = ["apples", "books", "marbles", "stickers", "coins", "pencils", "cookies", "stamps"]
_PRODUCTS = [
    "blender",
    "phone case",
    "novel",
    "hotel stay",
    "pair of shoes",
    "laptop",
    "coffee maker",
    "headphones",
    "restaurant meal",
    "movie",
]
_GOOD = [
    "works perfectly",
    "exceeded my expectations",
    "was a delight",
    "is worth every penny",
    "made my week",
    "is fantastic",
]
_BAD = [
    "broke after two days",
    "was a total waste of money",
    "is awful",
    "disappointed me badly",
    "arrived damaged",
    "is the worst purchase I made",
]
_SENTENCES = [
    "the cat sleeps on the warm windowsill",
    "we are going to the market tomorrow morning",
    "my brother plays the piano every evening",
    "the train to the city leaves at noon",
    "she bought fresh bread and cheese",
    "it has been raining all week",
    "the museum opens at nine o'clock",
    "our neighbours have a small garden",
    "I would like a cup of tea please",
    "the children are playing in the park",
]
_COMPANIES = ["Acme Corp", "Globex", "Initech", "Umbrella Ltd", "Stark Industries", "Wayne Enterprises"]
_CITIES = ["Lisbon", "Oslo", "Nairobi", "Osaka", "Lima", "Toronto", "Krakow", "Adelaide"]


def _sentiment(rng: random.Random) -> str:
    product, verdict = rng.choice(_PRODUCTS), rng.choice(_GOOD + _BAD)
    review = f"The {product} {verdict}."
    return rng.choice(
        [
            f"Review: {review}\nIs this review positive or negative?",
            f"Classify the sentiment of this review as positive or negative: {review}",
            f"What is the sentiment (positive/negative) of the following customer review? {review}",
        ]
    )


def _math(rng: random.Random) -> str:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, b, c = rng.randint(2, 60), rng.randint(2, 40), rng.randint(2, 9)
    return rng.choice(
        [
            f"{name} has {a} {item} and buys {b} more. How many {item} does {name} have now?",
            f"{name} had {a} {item} and gave away {min(a - 1, b)}. How many {item} are left?",
            f"A box holds {c} {item}. {name} fills {b} boxes. How many {item} are there in total?",
            f"Solve: {name} splits {a * c} {item} equally among {c} friends. How many does each friend get?",
        ]
    )


def _translate(rng: random.Random) -> str:
    sentence = rng.choice(_SENTENCES)
    return rng.choice(
        [
            f"Translate to French: {sentence.capitalize()}.",
            f'Translate the following English sentence into French: "{sentence}"',
            f"How do you say '{sentence}' in French?",
        ]
    )


def _extract(rng: random.Random) -> str:
    name, company, city = rng.choice(_NAMES), rng.choice(_COMPANIES), rng.choice(_CITIES)
    year = rng.randint(1990, 2024)
    text = f"{name} joined {company} in {city} in {year} as a senior engineer."
    return rng.choice(
        [
            f"Extract the person, company and city as JSON from: {text}",
            f"From the text below, pull out the organisation name and the year.\nText: {text}",
            f"Return a JSON object with keys name, company, city for this sentence: {text}",
        ]
    )


TASK_GENERATORS = {"sentiment": _sentiment, "math": _math, "translate_fr": _translate, "extract": _extract}


def task_prompts(n_per_task: int, seed: int) -> dict[str, list[str]]:
    """`n_per_task` generated prompts per task label (deterministic for a seed)."""
    rng = random.Random(seed)
    return {label: [make(rng) for _ in range(n_per_task)] for label, make in TASK_GENERATORS.items()}


HELDOUT_OOD = [
    "hey there, what are you up to?",
    "good afternoon!",
    "thank you so much",
    "haha that's funny",
    "do you dream?",
    "I can't decide what to eat for dinner",
    "what's your favourite colour?",
    "wow",
    "Guten Abend, wie war dein Tag?",
    "¿Qué hora es en Madrid?",
    "Ciao, come stai?",
    "Здравствуйте, чем занимаетесь?",
    "今日はとても暑いですね。",
    "我想去北京旅游。",
    "Who discovered penicillin?",
    "What is the tallest building in the world?",
    "How do bees make honey?",
    "Which planet has the most rings?",
    "How do I make a paper airplane?",
    "Any tips for keeping tomatoes fresh?",
    "What are good stretches for back pain?",
    "Write a short story about a dragon who is afraid of fire",
    "Compose a sonnet about coffee",
    "How do I install numpy?",
    "What is a linked list?",
    "Help me write a birthday message for my aunt",
    "Is it rude to be five minutes late?",
    "Tell me a fun fact about octopuses",
    "What should I name my startup?",
    "How far away is the sun?",
]
"""Out-of-scope prompts the router never saw (not in moe_adapters.ood_prompts)."""
