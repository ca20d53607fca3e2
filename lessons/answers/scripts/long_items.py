"""Lesson 9 ex 4: long items (20+ words), a corpus that paraphrases some of them in parts and shares only
boilerplate phrases with the others; contamination_report at n = 4 and n = 8."""
from minillm.eval.contamination import contamination_report, words, item_text

items = [  # (item, leaked?)
    ({"question": "According to the old records of the valley, which town was founded first by the river traders "
                  "who came from the northern hills?", "choices": ["Lindenfall", "Oakvale"], "answer": 0}, True),
    ({"question": "Which of the following is the most likely reason that the baker in Oakvale closed her shop early "
                  "every Sunday during the winter months?", "choices": ["to visit her sister in Ashcombe", "rain"],
      "answer": 0}, False),
    ({"question": "In the story told by the fishermen of Stonehaven, what did the old sailor find inside the wooden "
                  "chest that washed up on the beach?", "choices": ["a map of the eastern islands", "gold"],
      "answer": 0}, True),
    ({"question": "Which of the following best describes the main idea of the passage about the farmers who moved "
                  "from Millbrook to the coast?", "choices": ["they wanted better land", "war"], "answer": 0}, False),
    ({"question": "What is the name of the festival that the people of Fernwick hold at the end of every harvest "
                  "season to thank the weather?", "choices": ["the Lantern Night", "Midsummer"], "answer": 0}, True),
    ({"question": "Which of the following is the most likely reason that the weaver from Brackenford refused to sell "
                  "her red cloth at the market?", "choices": ["it was promised to the mayor", "it was torn"],
      "answer": 0}, False),
]
corpus = [
    # item 0, paraphrased in parts (clause order changed, one clause verbatim)
    "The old records of the valley say that Lindenfall was founded first, by the river traders who came from the "
    "northern hills, long before any other town.",
    # item 2, paraphrased in parts
    "The fishermen of Stonehaven tell a story. An old sailor opened the wooden chest that washed up on the beach "
    "and inside it he found a map of the eastern islands.",
    # item 4, first half verbatim, answer reworded
    "What is the name of the festival that the people of Fernwick hold at the end of every harvest season? They "
    "call it the Lantern Night, and they hold it to thank the weather for the crops.",
    # boilerplate only: exam phrasing and common phrases, about other things
    "Exam tips. Which of the following is the most likely reason that a student misses a question? Which of the "
    "following best describes the main idea of the passage is a question about the whole text.",
    "The shop closed early every Sunday during the winter months. She refused to sell at the market.",
]
for n in (4, 8):
    for thr in (0.5, 0.7):
        rep = contamination_report([it for it, _ in items], corpus, n=n, threshold=thr)
        flags = [r["contaminated"] for r in rep["per_item"]]
        caught = sum(f for f, (_, leak) in zip(flags, items) if leak)
        false = sum(f for f, (_, leak) in zip(flags, items) if not leak)
        print(f"n={n} threshold {thr}: leaked caught {caught}/3, clean flagged {false}/3; scores "
              + ", ".join(f"{r['score']:.2f}{'*' if leak else ''}" for r, (_, leak) in zip(rep["per_item"], items)))
print("words per item:", [len(words(item_text(it))) for it, _ in items], "(* = leaked)")
