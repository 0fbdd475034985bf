"""Seeded GSM8K-style word problems, so the project runs on a fresh machine without downloading GSM8K.

Each problem follows one quantity (a person's items, or money) through one to three arithmetic steps (add,
subtract, multiply, divide exactly). The gold solution is written in GSM8K's own format: one sentence per step with
a calculator annotation ``<<a*b=c>>``, then ``#### N``, so everything that reads GSM8K (``read_gsm8k``'s gold
parsing, the prompt, ``is_correct``) treats both sources alike. All intermediate results are positive integers.
"""

from __future__ import annotations

import random

from atmanrl.tasks.gsm8k import Problem

NAMES = [("Tom", "he", "his"), ("Maria", "she", "her"), ("Ali", "he", "his"), ("Lena", "she", "her"),
         ("Ken", "he", "his"), ("Priya", "she", "her"), ("Omar", "he", "his"), ("Sofia", "she", "her")]
ITEMS = ["apples", "marbles", "stickers", "cookies", "pencils", "books", "stamps", "shells"]
CONTAINERS = ["bags", "boxes", "jars", "baskets", "packs"]


def _divisors(x: int) -> list[int]:
    """Small divisors that leave at least 2 (exact division keeps every quantity a whole number)."""
    return [d for d in (2, 3, 4, 5) if x % d == 0 and x // d >= 2]


def _step(rng: random.Random, name: str, he: str, item: str, x: int) -> tuple[str, str, str, int]:
    """One arithmetic step on the quantity ``x``: (question sentence, operator, operand text, result)."""
    kinds = ["add", "mul"] + (["sub"] if x > 1 else []) + (["div"] if _divisors(x) else [])
    kind = rng.choice(kinds)
    if kind == "add":
        b = rng.randint(2, 40)
        sentence = rng.choice([f"Then {he} buys {b} more {item}.", f"A friend gives {name} {b} more {item}."])
        return sentence, "+", str(b), x + b
    if kind == "sub":
        b = rng.randint(1, x - 1)
        sentence = rng.choice([f"Then {he} gives away {b} {item}.", f"{name} loses {b} of the {item}."])
        return sentence, "-", str(b), x - b
    if kind == "mul":
        b = rng.randint(2, 6)
        words = {2: "doubles", 3: "triples"}
        if b in words and rng.random() < 0.5:
            return f"Then {he} {words[b]} the number of {item}.", "*", str(b), x * b
        return f"Then {he} ends up with {b} times as many {item}.", "*", str(b), x * b
    b = rng.choice(_divisors(x))
    sentence = rng.choice([f"Then {he} splits the {item} into {b} equal piles and keeps one pile.",
                           f"Then {he} shares the {item} equally among {b} people, {'himself' if he == 'he' else 'herself'} included."])
    return sentence, "/", str(b), x // b


def _items_problem(rng: random.Random, steps: int) -> Problem:
    name, he, his = rng.choice(NAMES)
    item = rng.choice(ITEMS)
    if rng.random() < 0.5:  # the start itself is a product, as in GSM8K's "3 boxes of 12"
        n, per, box = rng.randint(2, 9), rng.randint(2, 12), rng.choice(CONTAINERS)
        start = n * per
        question = [f"{name} has {n} {box} with {per} {item} in each."]
        lines = [f"{name} starts with {n}*{per} = <<{n}*{per}={start}>>{start} {item}."]
        steps -= 1
    else:
        start = rng.randint(3, 60)
        question, lines = [f"{name} has {start} {item}."], []
    x = start
    for _ in range(max(steps, 0)):
        sentence, op, b, y = _step(rng, name, he, item, x)
        question.append(sentence)
        lines.append(f"After that, {he} has {x}{op}{b} = <<{x}{op}{b}={y}>>{y} {item}.")
        x = y
    if not lines:  # a one-step problem needs one step even when the start was a plain number
        sentence, op, b, y = _step(rng, name, he, item, x)
        question.append(sentence)
        lines.append(f"After that, {he} has {x}{op}{b} = <<{x}{op}{b}={y}>>{y} {item}.")
        x = y
    question.append(f"How many {item} does {name} have now?")
    return Problem(" ".join(question), "\n".join(lines) + f"\n#### {x}", str(x))


def _money_problem(rng: random.Random, steps: int) -> Problem:
    name, he, his = rng.choice(NAMES)
    item = rng.choice(ITEMS)
    price, count = rng.randint(2, 15), rng.randint(2, 9)
    cost = price * count
    question = [f"One of the {item} costs ${price}. {name} buys {count} of them."]
    lines = [f"The {item} cost {count}*{price} = $<<{count}*{price}={cost}>>{cost}."]
    total, ask = cost, f"How much does {name} spend?"
    if steps >= 2:
        extra = rng.randint(1, 30)
        question.append(f"{he.capitalize()} also pays ${extra} for a bag.")
        lines.append(f"In total {he} spends {cost}+{extra} = $<<{cost}+{extra}={cost + extra}>>{cost + extra}.")
        total = cost + extra
        ask = f"How much does {name} spend in total?"
    if steps >= 3:
        bill = ((total // 10) + 1 + rng.randint(0, 3)) * 10
        question.append(f"{he.capitalize()} pays with ${bill}.")
        lines.append(f"{name} gets {bill}-{total} = $<<{bill}-{total}={bill - total}>>{bill - total} back.")
        total, ask = bill - total, f"How much change does {name} get?"
    question.append(ask)
    return Problem(" ".join(question), "\n".join(lines) + f"\n#### {total}", str(total))


def synthetic_problems(n: int, seed: int = 0) -> list[Problem]:
    """``n`` problems with one to three arithmetic steps; the same ``seed`` gives the same problems."""
    rng = random.Random(seed)
    problems = []
    for _ in range(n):
        steps = rng.randint(1, 3)
        make = _money_problem if rng.random() < 0.3 else _items_problem
        problems.append(make(rng, steps))
    return problems
