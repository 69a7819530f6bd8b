"""Writes the small data sets that ship with hpcft (no dataset hub needed):

    python data/generate.py      # -> data/samsum_tiny.jsonl (400), data/alpaca_tiny.jsonl (240), data/chat_tiny.jsonl (240),
    #                               data/grammar_tiny.csv (240)
    python data/generate.py --samsum-long 2000 artifacts/bench/samsum_long.jsonl   # benchmark data

Dialogues are made from templates with a fixed seed, so the files are reproducible. They are
meant for smoke tests and demos: short, varied, and learnable by a tiny model in a few steps.
"""
import json
import random
from pathlib import Path

NAMES = ["Anna", "Tom", "Maya", "Lucas", "Priya", "Omar", "Julia", "Ken", "Sofia", "Ben", "Lena", "Raj",
         "Chloe", "Marek", "Aisha", "Diego", "Hana", "Felix", "Nora", "Sam"]
PLACES = ["the Thai place", "the office", "the gym", "Central Station", "the library", "the park", "Mia's flat",
          "the cinema", "the coffee shop on 5th", "the lab"]
DAYS = ["today", "tomorrow", "on Monday", "on Friday", "this weekend", "next Tuesday", "tonight"]
TIMES = ["9:00", "10:30", "12:15", "13:00", "15:45", "18:00", "19:30", "20:00"]
ITEMS = ["the charger", "the report", "the keys", "the slides", "the tickets", "the blue folder", "the umbrella",
         "the laptop", "the receipts", "the cake"]
ACTIVITIES = ["lunch", "a run", "the meeting", "a movie", "dinner", "the review", "coffee", "a board game night"]


def meet(r):
    a, b = r.sample(NAMES, 2)
    act, place, day, t = r.choice(ACTIVITIES), r.choice(PLACES), r.choice(DAYS), r.choice(TIMES)
    lines = [f"{a}: Are we still on for {act} {day}?", f"{b}: Yes! {t} at {place}?",
             f"{a}: Perfect, see you there.", f"{b}: Great :)"]
    if r.random() < 0.5:
        lines.insert(2, f"{a}: Can we make it a bit later? I have a call before.")
        t2 = r.choice([x for x in TIMES if x != t])
        lines.insert(3, f"{b}: Sure, {t2} then.")
        t = t2
    return lines, f"{a} and {b} will meet for {act} at {place} {day} at {t}."


def forgot(r):
    a, b = r.sample(NAMES, 2)
    item, place = r.choice(ITEMS), r.choice(PLACES)
    lines = [f"{a}: Hey, did I leave {item} at {place}?", f"{b}: Let me check.", f"{b}: Yes, it's here.",
             f"{a}: Phew. Could you bring it {r.choice(DAYS)}?", f"{b}: No problem."]
    return lines, f"{a} left {item} at {place}. {b} will bring it."


def late(r):
    a, b = r.sample(NAMES, 2)
    mins = r.choice([5, 10, 15, 20, 30, 45])
    why = r.choice(["the train is delayed", "traffic is terrible", "I overslept", "my bike has a flat tyre",
                    "the meeting ran over"])
    lines = [f"{a}: I'm running {mins} minutes late, {why}.", f"{b}: No worries, I'll order for you.",
             f"{a}: Thanks, you're the best."]
    return lines, f"{a} will be {mins} minutes late because {why.replace('I ', a + ' ').replace('my ', 'their ')}. {b} will order."


def shopping(r):
    a, b = r.sample(NAMES, 2)
    items = r.sample(["milk", "eggs", "bread", "apples", "coffee", "rice", "tomatoes", "cheese", "pasta", "tea"], 3)
    lines = [f"{a}: I'm at the shop, need anything?", f"{b}: Yes please, {items[0]} and {items[1]}.",
             f"{b}: Oh and {items[2]} if they have it.", f"{a}: Got it."]
    return lines, f"{a} is at the shop and will buy {items[0]}, {items[1]} and {items[2]} for {b}."


def plan_trip(r):
    a, b, c = r.sample(NAMES, 3)
    city = r.choice(["Lisbon", "Kyoto", "Prague", "Oslo", "Cape Town", "Montreal", "Vienna", "Seoul"])
    month = r.choice(["March", "May", "July", "September", "October", "December"])
    lines = [f"{a}: Trip in {month}? I was thinking {city}.", f"{b}: I'm in!", f"{c}: Me too, but only after the 10th.",
             f"{a}: OK, I'll look at flights after the 10th."]
    return lines, f"{a}, {b} and {c} plan a trip to {city} in {month} after the 10th. {a} will check flights."


def samsum(n, seed=1):
    r = random.Random(seed)
    makers = [meet, forgot, late, shopping, plan_trip]
    out = []
    for i in range(n):
        lines, summary = makers[i % len(makers)](r)
        out.append({"id": f"tiny-{i:04d}", "dialogue": "\n".join(lines), "summary": summary})
    return out


def samsum_long(n, seed=3, max_parts=8):
    """SAMSum-like lengths: most dialogues short, a long tail of long ones (1 + geometric number of
    exchanges, 60 to ~600 tokens), so padding to the longest in a batch wastes a real share of compute.
    A generator: a million rows are written without holding them."""
    r = random.Random(seed)
    makers = [meet, forgot, late, shopping, plan_trip]
    for i in range(n):
        parts = 1
        while parts < max_parts and r.random() < 0.5:
            parts += 1
        lines, summaries = [], []
        for _ in range(parts):
            more, summary = r.choice(makers)(r)
            lines += more
            summaries.append(summary)
        yield {"id": f"long-{i:05d}", "dialogue": "\n".join(lines), "summary": " ".join(summaries)}


def alpaca(n, seed=2):
    r = random.Random(seed)
    out = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            a, b = r.randint(2, 99), r.randint(2, 99)
            out.append({"instruction": "Add the two numbers.", "input": f"{a} and {b}", "output": str(a + b)})
        elif kind == 1:
            words = r.sample(["red", "fast", "cloud", "river", "stone", "quiet", "lamp", "green", "tiger", "bread"], 4)
            out.append({"instruction": "Reverse the order of the words.", "input": " ".join(words),
                        "output": " ".join(reversed(words))})
        elif kind == 2:
            name = r.choice(NAMES)
            out.append({"instruction": f"Write a one-line greeting for {name}.", "input": "",
                        "output": f"Hello {name}, it is great to see you!"})
        else:
            w = r.choice(["apple", "banana", "kiwi", "plum", "grape", "mango", "cherry", "lemon"])
            out.append({"instruction": "Spell the word in capital letters.", "input": w, "output": w.upper()})
    return out


SYSTEMS = ["You are a helpful assistant.", "You are a concise assistant. Answer in one line.", ""]


def chat(n, seed=4):
    """Multi-turn conversations in the chat form ({"messages": [{"role", "content"}, ...]}): summaries of
    the samsum dialogues, sums with a follow-up question, spelling; a system turn in two of three."""
    r = random.Random(seed)
    makers = [meet, forgot, late, shopping, plan_trip]
    out = []
    for i in range(n):
        system = SYSTEMS[i % len(SYSTEMS)]
        msgs = [{"role": "system", "content": system}] if system else []
        kind = i % 3
        if kind == 0:
            lines, summary = makers[i % len(makers)](r)
            msgs += [{"role": "user", "content": "Summarize this chat:\n" + "\n".join(lines)},
                     {"role": "assistant", "content": summary}]
        elif kind == 1:
            a, b, k = r.randint(2, 60), r.randint(2, 60), r.randint(2, 4)
            msgs += [{"role": "user", "content": f"What is {a} plus {b}?"},
                     {"role": "assistant", "content": f"{a} plus {b} is {a + b}."},
                     {"role": "user", "content": f"And {k} times that?"},
                     {"role": "assistant", "content": f"{k} times {a + b} is {k * (a + b)}."}]
        else:
            w = r.choice(["apple", "banana", "kiwi", "plum", "grape", "mango", "cherry", "lemon", "river", "stone"])
            msgs += [{"role": "user", "content": f"Spell {w} in capital letters."},
                     {"role": "assistant", "content": w.upper()},
                     {"role": "user", "content": "Thanks!"},
                     {"role": "assistant", "content": "You are welcome."}]
        out.append({"id": f"chat-{i:04d}", "messages": msgs})
    return out


GRAMMAR = [  # (correct sentence, the same with one error), as llama-recipes' grammar data (JFLEG-style) pairs them
    ("{a} goes to {place} {day}.", "{a} go to {place} {day}."),
    ("{a} and {b} have finished {item}.", "{a} and {b} has finished {item}."),
    ("{a} did not bring {item}.", "{a} did not brought {item}."),
    ("{a} is meeting {b} at {t}.", "{a} are meeting {b} at {t}."),
    ("There are two meetings {day}.", "There is two meetings {day}."),
    ("{a} has been waiting since {t}.", "{a} have been waiting since {t}."),
    ("{a} bought {item} yesterday.", "{a} buyed {item} yesterday."),
    ("{a} and {b} were at {place}.", "{a} and {b} was at {place}."),
]


def grammar(n, seed=5):
    """llama-recipes' grammar form: {"input": a sentence with an error, "target": the corrected sentence}."""
    r = random.Random(seed)
    out = []
    for i in range(n):
        good, bad = GRAMMAR[i % len(GRAMMAR)]
        a, b = r.sample(NAMES, 2)
        fill = dict(a=a, b=b, place=r.choice(PLACES), day=r.choice(DAYS), t=r.choice(TIMES), item=r.choice(ITEMS))
        out.append({"input": bad.format(**fill), "target": good.format(**fill)})
    return out


def write_csv(path: Path, rows):
    import csv

    with path.open("w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def write(path: Path, rows):
    with path.open("w", encoding="utf-8") as f:  # streamed: --samsum-long writes millions of rows
        for row in rows:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    import sys

    if len(sys.argv) == 4 and sys.argv[1] == "--samsum-long":
        out = Path(sys.argv[3])
        out.parent.mkdir(parents=True, exist_ok=True)
        write(out, samsum_long(int(sys.argv[2])))
        sys.exit(0)
    here = Path(__file__).parent
    write(here / "samsum_tiny.jsonl", samsum(400))
    write(here / "alpaca_tiny.jsonl", alpaca(240))
    write(here / "chat_tiny.jsonl", chat(240))
    write_csv(here / "grammar_tiny.csv", grammar(240))
