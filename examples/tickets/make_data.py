"""Generate the classification example: customer messages -> the team that handles them.

Deterministic (fixed seed); run `python examples/tickets/make_data.py` to rebuild the CSV files.
Each message is a phrasing pattern filled with products, amounts and dates, so the test file holds
sentences the training file never shows.
"""

import csv
import random
from pathlib import Path

PATTERNS = {
    "billing": [
        "I was charged {amount} twice for my {product} subscription this month.",
        "Can I get a refund for the {product} plan? I cancelled on {day}.",
        "My invoice for {day} shows {amount} but my plan costs less.",
        "Why did my card get billed {amount} for {product}?",
        "Please send me a receipt for the {amount} payment I made on {day}.",
        "The discount code was not applied to my {product} order, I paid {amount}.",
    ],
    "technical": [
        "The {product} app crashes every time I open the settings page.",
        "I get error code {code} when I try to sync my {product}.",
        "Since the update on {day} my {product} will not connect to wifi.",
        "The {product} screen stays black after it starts.",
        "How do I reset my {product} to factory settings? It keeps freezing.",
        "Uploading files from the {product} fails with error {code}.",
    ],
    "shipping": [
        "My {product} order has not arrived yet, it was due on {day}.",
        "The tracking number for my {product} says delivered but I have nothing.",
        "Can you ship my {product} to a different address?",
        "The box with my {product} arrived damaged on {day}.",
        "How long does delivery of a {product} take to Canada?",
        "I received the wrong item instead of my {product}.",
    ],
    "account": [
        "I cannot log in to my account since {day}, the password reset email never comes.",
        "Please change the email address on my account.",
        "How do I delete my account and all my {product} data?",
        "Someone else may have signed in to my account on {day}.",
        "I want to add my partner as a second user on our {product} account.",
        "My username shows the wrong name, how can I change it?",
    ],
}
PRODUCTS = ["Aero speaker", "Nimbus tablet", "Pulse watch", "Orbit router", "Lumen lamp", "Vega camera"]
DAYS = ["March 3", "the 14th", "Monday", "last Friday", "June 21", "yesterday", "October 9"]


def rows(patterns: dict[str, list[str]], count: int, rng: random.Random) -> list[dict[str, str]]:
    out = []
    for index in range(count):
        team = list(patterns)[index % len(patterns)]
        message = rng.choice(patterns[team]).format(
            product=rng.choice(PRODUCTS), day=rng.choice(DAYS),
            amount=f"${rng.randint(5, 300)}.{rng.randint(0, 99):02d}", code=f"E{rng.randint(100, 999)}",
        )
        out.append({"message": message, "team": team})
    rng.shuffle(out)
    return out


def write(path: Path, data: list[dict[str, str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=["message", "team"])
        writer.writeheader()
        writer.writerows(data)


if __name__ == "__main__":
    here = Path(__file__).parent
    rng = random.Random(11)
    # The last pattern of each team is held out of training, so a third of the test rows are phrased anew.
    train_patterns = {team: patterns[:-1] for team, patterns in PATTERNS.items()}
    write(here / "train.csv", rows(train_patterns, 200, rng))
    write(here / "test.csv", rows(PATTERNS, 60, rng))
