"""Writes arithmetic.jsonl, the shipped sample training set (blend name
`sample`): short arithmetic word problems as chat conversations whose
assistant turn works the sum in a think block and then answers, and plain
texts of arithmetic facts. Everything is made up here from a fixed seed, so
running `python dms/training/sample_data/generate.py` reproduces the file
byte for byte.
"""

import json
import os
import random

NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Farah", "Gus", "Hana", "Ivo", "Jun", "Kofi", "Lena", "Milo",
         "Nia", "Omar", "Pia", "Quinn", "Rosa", "Sam", "Tara", "Uma", "Viktor", "Wen", "Yara", "Zoe"]
THINGS = ["apples", "marbles", "stickers", "pencils", "shells", "stamps", "cards", "books", "coins", "beads",
          "eggs", "buttons", "cookies", "tickets", "leaves"]
SYSTEM_PROMPTS = ["You are a careful maths tutor. Think step by step.",
                  "Answer with a short worked solution.",
                  "You help children check their arithmetic."]


def column_addition(a, b):
    """The steps of adding a and b digit by digit, with carries."""
    steps, carry, place = [], 0, 0
    da, db = str(a)[::-1], str(b)[::-1]
    for place in range(max(len(da), len(db))):
        x = int(da[place]) if place < len(da) else 0
        y = int(db[place]) if place < len(db) else 0
        s = x + y + carry
        note = f" plus carry {carry}" if carry else ""
        unit = ["ones", "tens", "hundreds", "thousands"][place]
        steps.append(f"{unit}: {x} + {y}{note} = {s}, write {s % 10}" + (", carry 1" if s >= 10 else ""))
        carry = s // 10
    if carry:
        steps.append("the last carry 1 goes in front")
    return steps


def add_problem(rng):
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    a, b = rng.randint(3, 99), rng.randint(2, 99)
    q = f"{name} has {a} {thing} and gets {b} more. How many {thing} does {name} have now?"
    think = "We add. " + "; ".join(column_addition(a, b)) + f". So {a} + {b} = {a + b}."
    return q, think, f"{name} has {a + b} {thing}.", (name, thing, a + b)


def sub_problem(rng):
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    a = rng.randint(10, 99)
    b = rng.randint(1, a - 1)
    q = f"{name} had {a} {thing} and gave away {b}. How many {thing} are left?"
    think = (f"We subtract {b} from {a}. Check by adding back: {a - b} + {b} = {a}. "
             f"So {a} - {b} = {a - b}.")
    return q, think, f"{a - b} {thing} are left.", (name, thing, a - b)


def mul_problem(rng):
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    a, b = rng.randint(2, 9), rng.randint(2, 12)
    q = f"{name} has {a} bags with {b} {thing} in each bag. How many {thing} is that in total?"
    partial = " + ".join([str(b)] * a)
    think = f"{a} bags of {b} is {partial} = {a * b}. So {a} x {b} = {a * b}."
    return q, think, f"That is {a * b} {thing} in total.", (name, thing, a * b)


def div_problem(rng):
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    k, b = rng.randint(2, 9), rng.randint(2, 12)
    total = k * b
    q = f"{name} shares {total} {thing} equally among {k} friends. How many {thing} does each friend get?"
    think = f"We divide {total} by {k}. {k} x {b} = {total}, so {total} / {k} = {b}."
    return q, think, f"Each friend gets {b} {thing}.", (name, thing, b)


def two_step_problem(rng):
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    a, b = rng.randint(2, 6), rng.randint(3, 10)
    c = rng.randint(1, a * b - 1)
    q = f"{name} buys {a} packs of {b} {thing} and then loses {c}. How many {thing} does {name} have?"
    think = f"First {a} x {b} = {a * b}. Then {a * b} - {c} = {a * b - c}."
    return q, think, f"{name} has {a * b - c} {thing}.", (name, thing, a * b - c)


PROBLEMS = [add_problem, sub_problem, mul_problem, div_problem, two_step_problem]


def assistant(think, answer):
    return f"<think>\n{think}\n</think>\n\n{answer}"


def conversation(rng):
    q, think, answer, (name, thing, have) = rng.choice(PROBLEMS)(rng)
    messages = []
    if rng.random() < 0.2:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    messages += [{"role": "user", "content": q}, {"role": "assistant", "content": assistant(think, answer)}]
    if rng.random() < 0.15:  # a follow-up turn on the same numbers
        more = rng.randint(1, 20)
        messages += [
            {"role": "user", "content": f"And if {name} then finds {more} more {thing}?"},
            {"role": "assistant", "content": assistant(f"{have} + {more} = {have + more}.",
                                                       f"Then {name} has {have + more} {thing}.")}]
    return {"messages": messages}


def fact_text(rng):
    kind = rng.randrange(3)
    if kind == 0:
        n = rng.randint(2, 12)
        return " ".join(f"{n} times {k} is {n * k}." for k in range(1, 11))
    if kind == 1:
        step, start = rng.randint(2, 9), rng.randint(0, 30)
        return f"Counting by {step} from {start}: " + ", ".join(str(start + step * k) for k in range(10)) + "."
    a = rng.randint(10, 99)
    parity = "even" if a % 2 == 0 else "odd"
    return (f"{a} is {parity}. {a} + 1 = {a + 1}. {a} - 1 = {a - 1}. Double {a} is {2 * a}. "
            f"Half of {2 * a} is {a}.")


def records(seed=0, n_chat=320, n_text=80):
    rng = random.Random(seed)
    out = [conversation(rng) for _ in range(n_chat)] + [{"text": fact_text(rng)} for _ in range(n_text)]
    rng.shuffle(out)
    return out


def main():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "arithmetic.jsonl")
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for record in records():
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    print(path)


if __name__ == "__main__":
    main()
