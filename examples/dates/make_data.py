"""Generate the demo dataset: dates written many ways -> ISO 8601 (YYYY-MM-DD).

Deterministic (fixed seed); run `python examples/dates/make_data.py` to rebuild the CSV files.
The base model gets this wrong (it answers in prose or in the wrong order); a few minutes of
LoRA fine-tuning teaches it the format.
"""

import csv
import datetime
import random
from pathlib import Path

FORMATS = [
    lambda d: d.strftime("%B %-d, %Y"),  # March 5, 2021
    lambda d: d.strftime("%-d %B %Y"),  # 5 March 2021
    lambda d: d.strftime("%b %-d %Y"),  # Mar 5 2021
    lambda d: d.strftime("%A, %B %-d, %Y"),  # Friday, March 5, 2021
    lambda d: d.strftime("%-d %b. %Y"),  # 5 Mar. 2021
    lambda d: f"the {ordinal(d.day)} of {d.strftime('%B %Y')}",  # the 5th of March 2021
    lambda d: d.strftime("%B %-d %Y"),  # March 5 2021
]


def ordinal(day: int) -> str:
    suffix = "th" if 11 <= day % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


def rows(count: int, rng: random.Random) -> list[dict[str, str]]:
    start = datetime.date(1950, 1, 1).toordinal()
    end = datetime.date(2049, 12, 31).toordinal()
    out = []
    for _ in range(count):
        day = datetime.date.fromordinal(rng.randint(start, end))
        out.append({"date": rng.choice(FORMATS)(day), "iso": day.isoformat()})
    return out


def write(path: Path, data: list[dict[str, str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=["date", "iso"])
        writer.writeheader()
        writer.writerows(data)


if __name__ == "__main__":
    here = Path(__file__).parent
    rng = random.Random(7)
    write(here / "train.csv", rows(400, rng))
    write(here / "test.csv", rows(60, rng))
