"""Generate the small synthetic data sets used by `make demo`.

Two domains, each a set of templated prompt/response pairs:
  math: grade-school arithmetic word problems, step-by-step answer ending in "The answer is X."
  code: small Python programming tasks, answer is a short function in a ```python block.

Writes, for each domain:
  DIR/<domain>_train.jsonl  {"prompt": ..., "response": ...}   (--train lines)
  DIR/<domain>_calib.jsonl  {"text": prompt + "\n" + response}  (--calib lines, disjoint from train)

Deterministic: every generator draws from a random.Random seeded from (--seed, domain, split).
Stdlib only, so it runs before anything is installed.
"""

import argparse
import json
import os
import random

NAMES = ["Ava", "Ben", "Chloe", "David", "Emma", "Finn", "Grace", "Hugo", "Isla", "Jack",
         "Lena", "Mia", "Noah", "Omar", "Priya", "Sam", "Tara", "Yusuf", "Zoe", "Leo"]
ITEMS = ["pencils", "notebooks", "apples", "oranges", "stickers", "marbles", "cookies", "books",
         "erasers", "cupcakes", "balloons", "toy cars"]


# ---------------------------------------------------------------- math

def math_shopping(r):
    name, item = r.choice(NAMES), r.choice(ITEMS)
    n, price, paid_extra = r.randint(2, 9), r.randint(2, 12), r.randint(1, 20)
    total = n * price
    paid = total + paid_extra
    prompt = (f"{name} buys {n} {item} that cost ${price} each and pays with ${paid}. "
              f"How much change does {name} get?")
    response = (f"The {item} cost {n} x ${price} = ${total}. "
                f"The change is ${paid} - ${total} = ${paid_extra}. The answer is {paid_extra}.")
    return prompt, response


def math_sharing(r):
    name = r.choice(NAMES)
    friends, each = r.randint(2, 8), r.randint(2, 9)
    total = friends * each
    item = r.choice(["apples", "cookies", "marbles", "stickers"])
    prompt = (f"{name} has {total} {item} and shares them equally among {friends} friends. "
              f"How many {item} does each friend get?")
    response = f"Each friend gets {total} / {friends} = {each} {item}. The answer is {each}."
    return prompt, response


def math_speed(r):
    speed, hours = r.randint(20, 90), r.randint(2, 6)
    dist = speed * hours
    who = r.choice(["A train", "A car", "A bus", "A cyclist"])
    if r.random() < 0.5:
        prompt = f"{who} travels at {speed} km per hour for {hours} hours. How far does it travel?"
        response = f"Distance = speed x time = {speed} x {hours} = {dist} km. The answer is {dist}."
    else:
        prompt = f"{who} travels {dist} km in {hours} hours. What is its average speed in km per hour?"
        response = f"Speed = distance / time = {dist} / {hours} = {speed} km per hour. The answer is {speed}."
    return prompt, response


def math_ages(r):
    a, b = r.sample(NAMES, 2)
    age_b, diff, years = r.randint(4, 30), r.randint(2, 25), r.randint(2, 10)
    age_a = age_b + diff
    prompt = (f"{a} is {diff} years older than {b}. {b} is {age_b} years old. "
              f"How old will {a} be in {years} years?")
    response = (f"{a} is {age_b} + {diff} = {age_a} years old now. "
                f"In {years} years {a} will be {age_a} + {years} = {age_a + years}. "
                f"The answer is {age_a + years}.")
    return prompt, response


def math_percent(r):
    # Only (price, pct) pairs with a whole-dollar discount, so every number in the answer is an integer.
    price, pct = r.choice([(p, q) for p in (20, 40, 50, 60, 80, 100, 120, 150, 200, 250)
                           for q in (10, 20, 25, 30, 40, 50) if p * q % 100 == 0])
    off = price * pct // 100
    item = r.choice(["jacket", "bike", "lamp", "backpack", "pair of shoes", "board game"])
    prompt = f"A {item} costs ${price}. It is on sale for {pct}% off. What is the sale price?"
    response = (f"The discount is {pct}% of ${price} = ${off}. "
                f"The sale price is ${price} - ${off} = ${price - off}. The answer is {price - off}.")
    return prompt, response


def math_rectangle(r):
    w, h = r.randint(3, 20), r.randint(3, 20)
    if r.random() < 0.5:
        prompt = f"A rectangular garden is {w} meters long and {h} meters wide. What is its area?"
        response = f"Area = length x width = {w} x {h} = {w * h} square meters. The answer is {w * h}."
    else:
        p = 2 * (w + h)
        prompt = (f"A rectangular field is {w} meters long and {h} meters wide. "
                  f"How many meters of fence go around it?")
        response = f"Perimeter = 2 x ({w} + {h}) = 2 x {w + h} = {p} meters. The answer is {p}."
    return prompt, response


def math_savings(r):
    name = r.choice(NAMES)
    start, weekly, weeks = r.randint(0, 50), r.randint(3, 25), r.randint(2, 12)
    saved = weekly * weeks
    prompt = (f"{name} has ${start} and saves ${weekly} every week. "
              f"How much money will {name} have after {weeks} weeks?")
    response = (f"{name} saves {weekly} x {weeks} = ${saved}. "
                f"Total = ${start} + ${saved} = ${start + saved}. The answer is {start + saved}.")
    return prompt, response


def math_giveaway(r):
    name, item = r.choice(NAMES), r.choice(ITEMS)
    have, gave, got = r.randint(20, 90), r.randint(1, 19), r.randint(1, 30)
    after = have - gave + got
    prompt = (f"{name} has {have} {item}, gives away {gave}, and then gets {got} more. "
              f"How many {item} does {name} have now?")
    response = (f"After giving away: {have} - {gave} = {have - gave}. "
                f"After getting more: {have - gave} + {got} = {after}. The answer is {after}.")
    return prompt, response


def math_time(r):
    hours, minutes = r.randint(1, 9), r.choice([0, 10, 15, 20, 30, 45])
    total = hours * 60 + minutes
    task = r.choice(["a movie", "a hike", "a flight", "a train ride", "a baking class"])
    prompt = f"{task.capitalize()} lasts {hours} hours and {minutes} minutes. How many minutes is that in total?"
    response = f"{hours} hours = {hours} x 60 = {hours * 60} minutes. {hours * 60} + {minutes} = {total}. The answer is {total}."
    return prompt, response


def math_average(r):
    name = r.choice(NAMES)
    k = r.randint(3, 5)
    scores = [r.randint(55, 99) for _ in range(k)]
    scores[-1] -= sum(scores) % k  # makes the mean an integer; scores stay in 51..99
    total = sum(scores)
    mean = total // k
    listed = ", ".join(map(str, scores))
    prompt = f"{name} scored {listed} on {k} tests. What is the average score?"
    response = f"The sum is {total}. The average is {total} / {k} = {mean}. The answer is {mean}."
    return prompt, response


def math_boxes(r):
    boxes, per_box, broken = r.randint(3, 12), r.randint(6, 24), r.randint(1, 5)
    total = boxes * per_box
    item = r.choice(["eggs", "cups", "bottles", "light bulbs"])
    prompt = f"A shop gets {boxes} boxes with {per_box} {item} in each box. {broken} {item} are broken. How many are not broken?"
    response = f"Total {item}: {boxes} x {per_box} = {total}. Not broken: {total} - {broken} = {total - broken}. The answer is {total - broken}."
    return prompt, response


MATH_TEMPLATES = [math_shopping, math_sharing, math_speed, math_ages, math_percent, math_rectangle,
                  math_savings, math_giveaway, math_time, math_average, math_boxes]


# ---------------------------------------------------------------- code

LIST_PARAMS = ["nums", "numbers", "values", "items", "xs", "data", "arr", "lst", "seq"]
STR_PARAMS = ["s", "text", "word", "string", "value", "line", "phrase", "msg"]
INT_PARAMS = ["n", "k", "num", "count", "limit", "idx", "m"]
CODE_LEADS = ["Write a Python function", "Implement a Python function", "Create a Python function",
              "Define a function", "Write a function in Python", "Please write a Python function"]


def code_task(r, signature, description, src, note):
    # One shared prompt/response shape for every code family: varied lead-in, fenced code, one-line note.
    prompt = f"{r.choice(CODE_LEADS)} `{signature}` that {description}"
    return prompt, "```python\n" + src + "\n```\n" + note


def code_reverse(r):
    fn, p = r.choice(["reverse_string", "reverse_text", "reversed_str", "flip", "backwards"]), r.choice(STR_PARAMS)
    return code_task(r, f"{fn}({p})", f"returns the string `{p}` reversed.",
                     f"def {fn}({p}):\n    return {p}[::-1]",
                     "Slicing with a step of -1 walks the string backwards.")


def code_sum(r):
    fn, p = r.choice(["sum_list", "total", "add_all", "list_sum", "sum_of"]), r.choice(LIST_PARAMS)
    return code_task(r, f"{fn}({p})", f"returns the sum of the numbers in `{p}` without using the built-in sum.",
                     f"def {fn}({p}):\n    result = 0\n    for x in {p}:\n        result += x\n    return result",
                     "The loop adds each element to a running total.")


def code_factorial(r):
    fn, p = r.choice(["factorial", "fact", "compute_factorial", "fac"]), r.choice(INT_PARAMS)
    return code_task(r, f"{fn}({p})", f"returns the factorial of the non-negative integer `{p}`.",
                     f"def {fn}({p}):\n    result = 1\n    for i in range(2, {p} + 1):\n        result *= i\n    return result",
                     f"It multiplies all integers from 2 to {p}; the factorial of 0 is 1.")


def code_fizzbuzz(r):
    a, b = r.choice([(3, 5), (2, 7), (3, 7), (4, 6), (2, 5), (3, 4)])
    w1, w2 = r.choice([("Fizz", "Buzz"), ("Foo", "Bar"), ("Ping", "Pong"), ("Hip", "Hop")])
    fn, p = r.choice(["fizzbuzz", "fizz_buzz", "label", "say"]), r.choice(INT_PARAMS)
    src = (f"def {fn}({p}):\n    if {p} % {a} == 0 and {p} % {b} == 0:\n        return \"{w1}{w2}\"\n"
           f"    if {p} % {a} == 0:\n        return \"{w1}\"\n    if {p} % {b} == 0:\n        return \"{w2}\"\n"
           f"    return str({p})")
    return code_task(r, f"{fn}({p})",
                     f"returns \"{w1}{w2}\" if `{p}` is divisible by both {a} and {b}, \"{w1}\" if only by {a}, "
                     f"\"{w2}\" if only by {b}, otherwise `{p}` as a string.",
                     src, "The combined case is checked first so it is not shadowed.")


def code_vowels(r):
    fn, p = r.choice(["count_vowels", "vowel_count", "num_vowels", "vowels"]), r.choice(STR_PARAMS)
    return code_task(r, f"{fn}({p})", f"counts the vowels (a, e, i, o, u, either case) in `{p}`.",
                     f"def {fn}({p}):\n    return sum(1 for c in {p}.lower() if c in \"aeiou\")",
                     "Lowercasing first makes the check case-insensitive.")


def code_palindrome(r):
    fn, p = r.choice(["is_palindrome", "palindrome", "reads_same_backwards", "check_palindrome"]), r.choice(STR_PARAMS)
    return code_task(r, f"{fn}({p})", f"returns True if `{p}` reads the same forwards and backwards, ignoring case.",
                     f"def {fn}({p}):\n    t = {p}.lower()\n    return t == t[::-1]",
                     "It compares the lowercased string with its reverse.")


def code_max(r):
    fn, p = r.choice(["find_max", "largest", "max_value", "biggest"]), r.choice(LIST_PARAMS)
    return code_task(r, f"{fn}({p})", f"returns the largest number in the non-empty list `{p}` without using max().",
                     f"def {fn}({p}):\n    best = {p}[0]\n    for x in {p}[1:]:\n        if x > best:\n"
                     f"            best = x\n    return best",
                     "It keeps the largest value seen so far.")


def code_fibonacci(r):
    fn, p = r.choice(["fibonacci", "fib", "nth_fib", "fibo"]), r.choice(INT_PARAMS)
    a0, a1 = r.choice([(0, 1), (1, 1), (2, 1), (1, 3)])
    seq = "Fibonacci sequence" if (a0, a1) == (0, 1) else f"Fibonacci-like sequence starting {a0}, {a1}"
    return code_task(r, f"{fn}({p})", f"returns the `{p}`-th number (0-indexed) of the {seq}.",
                     f"def {fn}({p}):\n    a, b = {a0}, {a1}\n    for _ in range({p}):\n        a, b = b, a + b\n    return a",
                     "Each iteration shifts the pair one step along the sequence.")


def code_celsius(r):
    fn = r.choice(["celsius_to_fahrenheit", "c_to_f", "to_fahrenheit", "convert_temp"])
    p = r.choice(["c", "celsius", "temp", "degrees", "t"])
    digits = r.choice([0, 1, 2])
    return code_task(r, f"{fn}({p})", f"converts `{p}` degrees Celsius to Fahrenheit, rounded to {digits} decimal places.",
                     f"def {fn}({p}):\n    return round({p} * 9 / 5 + 32, {digits})",
                     "It applies F = C * 9/5 + 32 and rounds the result.")


def code_filter_parity(r):
    kind, rem = r.choice([("even", 0), ("odd", 1)])
    fn = r.choice(["filter_{}", "{}s", "keep_{}", "only_{}"]).format(kind)
    p = r.choice(LIST_PARAMS)
    return code_task(r, f"{fn}({p})", f"returns a new list with only the {kind} numbers from `{p}`.",
                     f"def {fn}({p}):\n    return [x for x in {p} if x % 2 == {rem}]",
                     f"The list comprehension keeps elements whose remainder mod 2 is {rem}.")


def code_scale(r):
    fn, p, k = r.choice(["scale", "multiply_all", "times", "scaled"]), r.choice(LIST_PARAMS), r.randint(2, 12)
    return code_task(r, f"{fn}({p})", f"returns a new list with every element of `{p}` multiplied by {k}.",
                     f"def {fn}({p}):\n    return [x * {k} for x in {p}]",
                     "A list comprehension builds the scaled copy without modifying the input.")


def code_count_char(r):
    fn, p, ch = r.choice(["count_char", "occurrences", "char_count"]), r.choice(STR_PARAMS), r.choice("abcdexyz")
    return code_task(r, f"{fn}({p})", f"returns how many times the letter '{ch}' appears in `{p}`.",
                     f"def {fn}({p}):\n    n = 0\n    for c in {p}:\n        if c == '{ch}':\n            n += 1\n    return n",
                     "It scans the string once and counts matches.")


def code_clamp(r):
    fn, p = r.choice(["clamp", "bound", "limit_value", "clip"]), r.choice(["x", "value", "v", "n"])
    lo = r.randint(-10, 10)
    hi = lo + r.randint(5, 100)
    return code_task(r, f"{fn}({p})", f"limits `{p}` to the range {lo} to {hi} inclusive.",
                     f"def {fn}({p}):\n    return max({lo}, min({hi}, {p}))",
                     "min caps the value at the top and max raises it to the bottom.")


def code_word_count(r):
    fn, p = r.choice(["word_count", "count_words", "num_words", "words_in"]), r.choice(STR_PARAMS)
    return code_task(r, f"{fn}({p})", f"returns the number of whitespace-separated words in `{p}`.",
                     f"def {fn}({p}):\n    return len({p}.split())",
                     "str.split() with no argument splits on any run of whitespace.")


CODE_TEMPLATES = [code_reverse, code_sum, code_factorial, code_fizzbuzz, code_vowels, code_palindrome,
                  code_max, code_fibonacci, code_celsius, code_filter_parity, code_scale, code_count_char,
                  code_clamp, code_word_count]

DOMAINS = {"math": MATH_TEMPLATES, "code": CODE_TEMPLATES}


# ---------------------------------------------------------------- writing

def sample_pairs(templates, rng, n, exclude=frozenset()):
    # Cycle through the templates so every family is represented; a duplicate or excluded prompt is
    # dropped and the cycle moves on, so one small family cannot stall it. Gives up after 50*n tries.
    pairs, seen = [], set(exclude)
    for tries in range(50 * n + 100):
        if len(pairs) == n:
            break
        prompt, response = templates[tries % len(templates)](rng)
        if prompt in seen:
            continue
        seen.add(prompt)
        pairs.append((prompt, response))
    if len(pairs) < n:
        raise SystemExit(f"could only generate {len(pairs)} distinct examples, asked for {n}")
    return pairs


def write_jsonl(path, rows):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def write_domain(out_dir, domain, templates, seed, n_train, n_calib):
    # String seeds are hashed deterministically by random.Random (independent of PYTHONHASHSEED).
    train = sample_pairs(templates, random.Random(f"{seed}-{domain}-train"), n_train)
    calib = sample_pairs(templates, random.Random(f"{seed}-{domain}-calib"), n_calib,
                         exclude=frozenset(p for p, _ in train))
    write_jsonl(os.path.join(out_dir, f"{domain}_train.jsonl"),
                [{"prompt": p, "response": a} for p, a in train])
    write_jsonl(os.path.join(out_dir, f"{domain}_calib.jsonl"),
                [{"text": p + "\n" + a} for p, a in calib])
    return len(train), len(calib)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train", type=int, default=400, help="training examples per domain")
    ap.add_argument("--calib", type=int, default=24, help="calibration texts per domain")
    args = ap.parse_args()
    if args.train < 1 or args.calib < 0:
        ap.error("--train must be >= 1 and --calib >= 0")

    os.makedirs(args.out, exist_ok=True)
    counts = {d: write_domain(args.out, d, t, args.seed, args.train, args.calib) for d, t in DOMAINS.items()}
    summary = ", ".join(f"{d}: {n} train + {m} calib" for d, (n, m) in counts.items())
    print(f"demo_data: wrote {summary} to {args.out} (seed {args.seed})")


if __name__ == "__main__":
    main()
