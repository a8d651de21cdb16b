"""Deterministic generators for velotune's small bundled datasets, written for this project (no
third-party dataset text): every answer is computed, so it is correct by construction.

* `instruction_rows()`  Alpaca-style instruction/input/output rows over ten small task families.
* `conversation_rows()` ShareGPT-style multi-turn conversations (human/gpt) built from them.
* `arithmetic_word_problems(n, seed)` grade-school word problems with integer answers, for the
  GRPO examples (prompt/answer plus a worked solution).
"""

from __future__ import annotations

import random

_NUMBER_WORDS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
                 "fifteen sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_WORDS = ("garden window planet river butter candle forest pencil rocket silver turtle violin meadow "
          "lantern harbor orange puzzle shadow thunder velvet wander marble pepper kettle jacket").split()
_CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Kenya", "Nairobi"), ("Canada", "Ottawa"),
             ("Peru", "Lima"), ("Norway", "Oslo"), ("Egypt", "Cairo"), ("Spain", "Madrid"),
             ("Australia", "Canberra"), ("India", "New Delhi"), ("Brazil", "Brasilia"), ("Italy", "Rome"),
             ("Germany", "Berlin"), ("Mexico", "Mexico City"), ("Portugal", "Lisbon"), ("Greece", "Athens"),
             ("Chile", "Santiago"), ("Poland", "Warsaw"), ("Vietnam", "Hanoi"), ("Ireland", "Dublin"),
             ("Sweden", "Stockholm"), ("Turkey", "Ankara"), ("Argentina", "Buenos Aires"), ("Ghana", "Accra"),
             ("Finland", "Helsinki"), ("Austria", "Vienna"), ("Thailand", "Bangkok"), ("Cuba", "Havana"),
             ("Morocco", "Rabat"), ("Hungary", "Budapest")]
_OPPOSITES = [("hot", "cold"), ("early", "late"), ("full", "empty"), ("heavy", "light"), ("open", "closed"),
              ("loud", "quiet"), ("wide", "narrow"), ("rough", "smooth"), ("ancient", "modern"), ("sharp", "dull"),
              ("brave", "cowardly"), ("generous", "stingy"), ("shallow", "deep"), ("tight", "loose"),
              ("visible", "invisible"), ("wet", "dry"), ("strong", "weak"), ("rich", "poor"), ("fast", "slow"),
              ("happy", "sad"), ("clean", "dirty"), ("high", "low"), ("hard", "soft"), ("thick", "thin"),
              ("young", "old"), ("near", "far"), ("first", "last"), ("inside", "outside"), ("win", "lose"),
              ("buy", "sell")]


def number_in_words(n: int) -> str:
    if n < 20:
        return _NUMBER_WORDS[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else "-" + _NUMBER_WORDS[n % 10])
    if n < 1000:
        rest = n % 100
        return _NUMBER_WORDS[n // 100] + " hundred" + ("" if rest == 0 else " and " + number_in_words(rest))
    raise ValueError("numbers up to 999 only")


def _smallest_factor(n: int) -> int:
    return next((d for d in range(2, int(n ** 0.5) + 1) if n % d == 0), n)


def _row(instruction: str, output: str, input: str = "") -> dict:
    return {"instruction": instruction, "input": input, "output": output}


def _families(rng: random.Random):
    """Each yields (instruction, input, output) for one random draw."""

    def celsius():
        c = rng.randrange(-20, 101, 5)
        f = c * 9 / 5 + 32
        return _row(f"Convert {c} degrees Celsius to Fahrenheit.", f"{c} °C is {f:g} °F, since F = C × 9/5 + 32.")

    def reverse():
        w = rng.choice(_WORDS)
        return _row("Reverse the letters of the word.", f"{w[::-1]}", w)

    def sort_numbers():
        xs = rng.sample(range(1, 100), rng.randint(4, 7))
        return _row("Sort these numbers from smallest to largest.", ", ".join(map(str, sorted(xs))),
                    ", ".join(map(str, xs)))

    def vowels():
        w = rng.choice(_WORDS)
        n = sum(ch in "aeiou" for ch in w)
        return _row("How many vowels does this word contain?",
                    f"The word \"{w}\" contains {n} vowel{'' if n == 1 else 's'}.", w)

    def prime():
        n = rng.randint(2, 150)
        d = _smallest_factor(n)
        answer = f"Yes, {n} is a prime number." if d == n else f"No, {n} is not prime: {n} = {d} × {n // d}."
        return _row(f"Is {n} a prime number?", answer)

    def kilometres():
        km = rng.randint(1, 60) / 4
        return _row(f"How many metres are there in {km:g} kilometres?", f"{km:g} km is {km * 1000:g} metres.")

    def capital():
        country, city = rng.choice(_CAPITALS)
        return _row(f"What is the capital of {country}?", f"The capital of {country} is {city}.")

    def opposite():
        a, b = rng.choice(_OPPOSITES)
        if rng.random() < 0.5:
            a, b = b, a
        return _row("Give the opposite of the word.", f"The opposite of \"{a}\" is \"{b}\".", a)

    def words():
        n = rng.randint(0, 999)
        return _row("Write the number in words.", number_in_words(n), str(n))

    def sum_list():
        xs = [rng.randint(1, 50) for _ in range(rng.randint(3, 6))]
        return _row("Add up these numbers.", f"{' + '.join(map(str, xs))} = {sum(xs)}", ", ".join(map(str, xs)))

    return [celsius, reverse, sort_numbers, vowels, prime, kilometres, capital, opposite, words, sum_list]


def instruction_rows(n: int = 300, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    families = _families(rng)
    return [families[i % len(families)]() for i in range(n)]


_THANKS = ["Thanks!", "Great, thank you.", "Perfect, thanks a lot.", "That helps, thanks."]
_WELCOME = ["You're welcome!", "Glad I could help.", "Happy to help. Ask me anything else any time.",
            "You're welcome. Good luck!"]


def conversation_rows(n: int = 300, seed: int = 1) -> list[dict]:
    """Two or three question/answer turns, sometimes closed by a thank-you turn."""
    rng = random.Random(seed)
    families = _families(rng)
    rows = []
    for _ in range(n):
        convo = []
        for _ in range(rng.randint(2, 3)):
            r = rng.choice(families)()
            question = r["instruction"] + (f"\n{r['input']}" if r["input"] else "")
            convo += [{"from": "human", "value": question}, {"from": "gpt", "value": r["output"]}]
        if rng.random() < 0.4:
            convo += [{"from": "human", "value": rng.choice(_THANKS)}, {"from": "gpt", "value": rng.choice(_WELCOME)}]
        rows.append({"conversations": convo})
    return rows


_NAMES = ["Ava", "Ben", "Chloe", "Dev", "Elena", "Farid", "Grace", "Hiro", "Isla", "Jonas", "Kemi", "Liam",
          "Maya", "Nico", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tara"]
_ITEMS = ["apples", "pencils", "stickers", "marbles", "cookies", "books", "stamps", "shells", "cards", "eggs"]


def _problem(rng: random.Random) -> tuple[str, int, str]:
    name, other = rng.sample(_NAMES, 2)
    item = rng.choice(_ITEMS)
    kind = rng.randrange(6)
    if kind == 0:
        a, b, c = rng.randint(10, 60), rng.randint(5, 40), rng.randint(1, 9)
        c = min(c, a + b)
        return (f"{name} has {a} {item}. {other} gives {name} {b} more, and then {name} gives away {c}. "
                f"How many {item} does {name} have now?", a + b - c, f"{a} + {b} - {c} = {a + b - c}")
    if kind == 1:
        n, price = rng.randint(2, 12), rng.randint(2, 15)
        return (f"{name} buys {n} {item} that cost ${price} each. How many dollars does {name} spend?",
                n * price, f"{n} × {price} = {n * price}")
    if kind == 2:
        per, groups = rng.randint(2, 9), rng.randint(2, 9)
        total = per * groups
        return (f"{name} shares {total} {item} equally among {groups} friends. How many {item} does each "
                f"friend get?", per, f"{total} ÷ {groups} = {per}")
    if kind == 3:
        pages, days = rng.randint(5, 30), rng.randint(3, 14)
        return (f"{name} reads {pages} pages every day for {days} days. How many pages does {name} read in all?",
                pages * days, f"{pages} × {days} = {pages * days}")
    if kind == 4:
        boxes, per, eaten = rng.randint(2, 8), rng.randint(6, 12), rng.randint(1, 10)
        return (f"{name} has {boxes} boxes with {per} {item} in each box and loses {eaten} of them. "
                f"How many {item} are left?", boxes * per - eaten, f"{boxes} × {per} - {eaten} = {boxes * per - eaten}")
    money, price = rng.randint(20, 100), rng.randint(2, 9)
    count = money // price
    return (f"{name} has ${money} and each of the {item} costs ${price}. What is the largest number of {item} "
            f"{name} can buy?", count, f"{money} ÷ {price} = {count} with ${money - count * price} left over")


def arithmetic_word_problems(n: int = 200, seed: int = 0) -> list[dict]:
    """`n` problems as {"prompt", "answer", "solution"}; the same (n, seed) gives the same list."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt, answer, working = _problem(rng)
        out.append({"prompt": prompt, "answer": str(answer), "solution": f"{working}. The answer is {answer}."})
    return out
