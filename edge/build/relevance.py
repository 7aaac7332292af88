"""Calibrate an embedder's relevance gate at build time; the thresholds go in its manifest.

`edge-rag ask` refuses a question the documents do not cover. What "covered" means is a cosine
threshold, and cosines are on each embedder's own scale (all-MiniLM-L6-v2 gives unrelated texts
0.0-0.25, other models sit higher), so the thresholds are measured per embedder when its bundle
is built and read from its manifest by rag.retrieve, never written in code:

    passages   paragraphs of pydoc_data.topics (the Python reference; every Python has it)
    off-topic  OFF_TOPIC: everyday questions no technical document answers
    on-topic   the first sentence of a passage, asked against all passages (its own included)

    min_cosine                the highest top cosine an off-topic question reached + MARGIN: above
                              it a question is covered on the vector side alone
    min_cosine_with_keywords  the off-topic median top cosine: with the keyword side agreeing (half
                              the question's terms in the best keyword hit), this is enough

The on-topic top cosines are recorded next to them (`on_topic_p10`), so a manifest shows how far
apart the two sides were for this embedder; where they do not separate at all, the cosine cannot
refuse anything (`separates: false`, thresholds -1).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

MARGIN = 0.05
N_PASSAGES = 400
N_ON_TOPIC = 60
MIN_KEYWORD_COVERAGE = 0.5  # share of the question's terms in the best keyword hit (rag.retrieve)

OFF_TOPIC = (
    "What is the capital city of Australia?",
    "How long should I boil an egg for a soft yolk?",
    "Who won the football world cup in 1998?",
    "What is a good name for a golden retriever puppy?",
    "How many calories are in a banana?",
    "When was the Eiffel Tower built?",
    "What is the best way to learn to play the guitar?",
    "Can you recommend a romantic comedy film?",
    "Why is the sky blue during the day?",
    "How do I get red wine out of a carpet?",
    "What should I pack for a beach holiday?",
    "Who painted the Mona Lisa?",
    "How tall is Mount Everest?",
    "What is the recipe for chocolate chip cookies?",
    "How do I grow tomatoes on a balcony?",
    "Which planet has the most moons?",
    "What time does the sun set in winter in Norway?",
    "How can I improve my marathon running time?",
    "What are the rules of cricket?",
    "Who wrote Pride and Prejudice?",
    "How do I tie a bow tie?",
    "What is the population of Brazil?",
    "Is it going to rain tomorrow in London?",
    "How do cats purr?",
    "What wine goes well with salmon?",
    "How do I apologise to a friend after an argument?",
    "What is the meaning of the poem The Road Not Taken?",
    "How many players are on a basketball team?",
    "What is the plot of Hamlet?",
    "Where do penguins live?",
    "How do I make my houseplants grow faster?",
    "Which is the longest river in Africa?",
    "How should I train for my first triathlon?",
    "What did the dinosaurs eat?",
    "How do I knit a scarf?",
    "What are the symptoms of a common cold?",
    "Who was the first person to walk on the moon?",
    "How do bees make honey?",
    "What is a healthy breakfast for kids?",
    "How do I choose a good watermelon?",
)


def _passages(n: int = N_PASSAGES) -> list[str]:
    import pydoc_data.topics as topics

    paras = [" ".join(p.split()) for k in sorted(topics.topics) for p in topics.topics[k].split("\n\n")]
    paras = [p for p in paras if 200 <= len(p) <= 1200 and p[0].isalpha()]
    return paras[:: max(1, len(paras) // n)][:n]


def _first_sentence(p: str) -> str:
    s = p.split(". ")[0]
    return s if len(s) >= 30 else p[:160]


def calibrate_gate(embed: Callable[[list[str]], np.ndarray]) -> dict:
    """Thresholds of the relevance gate for the embedder behind `embed` (texts -> unit vectors)."""
    passages = _passages()
    P = np.asarray(embed(passages), np.float32)  # [n, dim], unit norm
    off = np.asarray(embed(list(OFF_TOPIC)), np.float32) @ P.T  # [q, n]
    on_src = passages[:: max(1, len(passages) // N_ON_TOPIC)][:N_ON_TOPIC]
    on = np.asarray(embed([_first_sentence(p) for p in on_src]), np.float32) @ P.T
    off_top, on_top = off.max(axis=1), on.max(axis=1)
    # NOTE: an embedder whose on-topic questions reach no higher than its off-topic ones plus the margin
    # (a random test model gives every pair ~1.0) cannot tell covered from uncovered: its cosine never
    # refuses (-1), and the keyword evidence alone cannot refuse either, so nothing is refused. Without
    # the margin here, on-topic 1.0 over off-topic 0.99999 "separated" and min_cosine 1.05 refused all.
    separates = bool(np.percentile(on_top, 10) > off_top.max() + MARGIN)
    return {
        "min_cosine": round(float(off_top.max()) + MARGIN, 3) if separates else -1.0,
        "min_cosine_with_keywords": round(float(np.median(off_top)), 3) if separates else -1.0,
        "separates": separates,
        "min_keyword_coverage": MIN_KEYWORD_COVERAGE,
        "off_topic_max": round(float(off_top.max()), 3),
        "off_topic_median": round(float(np.median(off_top)), 3),
        "on_topic_p10": round(float(np.percentile(on_top, 10)), 3),
        "calibration": f"pydoc_data.topics: {len(passages)} passages, {len(OFF_TOPIC)} off-topic and "
                       f"{len(on_src)} on-topic questions; margin {MARGIN}",
    }


def onnx_embed_fn(model_path, tokenizer_json, max_seq_length: int, pad_id: int = 0, threads: int | None = None,
                  batch: int = 16) -> Callable[[list[str]], np.ndarray]:
    """texts -> embeddings through a just-written model.onnx (the build has no Bundle yet)."""
    from tokenizers import Tokenizer

    from edge.runtime.embedder import length_buckets, open_ort_session

    tok = Tokenizer.from_file(str(tokenizer_json))
    tok.no_padding()
    tok.enable_truncation(max_length=max_seq_length)
    sess = open_ort_session(model_path, threads=threads)

    def embed(texts: list[str]) -> np.ndarray:
        ids = [e.ids for e in tok.encode_batch(texts)]
        out = np.empty((len(ids), 0), np.float32)
        # rows of one length a call: the int8 graph reads no padding mask (edge.build.encoder PADDING)
        for idx in length_buckets([len(x) for x in ids], batch, exact=True):
            a = np.asarray([ids[i] for i in idx], np.int32)
            v = sess.run(None, {"input_ids": a, "attention_mask": np.ones_like(a)})[0]
            if out.shape[1] != v.shape[1]:
                out = np.empty((len(ids), v.shape[1]), np.float32)
            out[idx] = v
        return out

    return embed
