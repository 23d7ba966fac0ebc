"""A generated Alpaca-format dataset a tiny model can learn in a few hundred steps.

The demo and the end-to-end tests need a loss that visibly falls on a random-weight model:
short, deterministic answers (sums, reversed word lists, lookups in the table below) give that,
where real instruction data would not move in so few steps.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

# The lookup table the model has to memorise: invented countries, so no pretraining helps.
CAPITALS = {
    "Aldoria": "Brennik",
    "Belvasta": "Cormath",
    "Caldera": "Dunvale",
    "Dravonia": "Eskerow",
    "Elmaris": "Fennhold",
    "Fjordane": "Galloway",
    "Grenholm": "Hathmere",
    "Hollandra": "Ivrest",
    "Istrava": "Jorvik",
    "Jadeport": "Kelvane",
    "Korthia": "Lunmark",
    "Lorwyn": "Marrowby",
    "Mirevale": "Northam",
    "Norvania": "Osterlund",
    "Orlesia": "Pemberton",
    "Pyrrhos": "Quellin",
}
WORDS = ("red", "blue", "green", "stone", "river", "cloud", "apple", "tiger", "lamp", "music", "paper", "silver")


def _addition(rng: random.Random) -> dict[str, str]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return {"instruction": "Add the two numbers.", "input": f"{a} + {b}", "output": str(a + b)}


def _reverse(rng: random.Random) -> dict[str, str]:
    words = rng.sample(WORDS, rng.randint(3, 5))
    return {
        "instruction": "Reverse the order of the words.",
        "input": " ".join(words),
        "output": " ".join(reversed(words)),
    }


def _capital(rng: random.Random) -> dict[str, str]:
    country = rng.choice(sorted(CAPITALS))
    return {
        "instruction": f"What is the capital of {country}?",
        "input": "",
        "output": f"The capital of {country} is {CAPITALS[country]}.",
    }


TASKS = (_addition, _reverse, _capital)


def learnable_examples(count: int, *, seed: int = 0) -> list[dict[str, Any]]:
    """`count` Alpaca records cycling through the tasks, fixed by `seed`."""
    if count < 1:
        raise ValueError(f"count must be positive, got {count}")
    rng = random.Random(seed)
    return [TASKS[i % len(TASKS)](rng) for i in range(count)]


def write_learnable_dataset(path: str | Path, *, examples: int = 2000, seed: int = 0) -> Path:
    """Write the generated dataset as JSONL (one Alpaca record per line)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = (json.dumps(r, ensure_ascii=False) for r in learnable_examples(examples, seed=seed))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
