"""Answer quality: `ask` over three corpora, next to llama.cpp on the same GGUF and the same prompts.

    python bench/bench_answers.py [--engine BUNDLE] [--corpus manuals,pydoc,man,info] [--split test|heldout|both]
                                  [--peer] [--offset N] [--limit N] [--ids 0,4,17] [--uncovered yes|no|only]
                                  [--reuse-index]
                                  [--passages N] [--threads 2] [--backend auto|onnxruntime|native] [--details out.jsonl]
    python bench/bench_answers.py --summarize d1.jsonl d2.jsonl ...   (merge the --details of the jobs a set
                                  was split into: the same JSON lines as one run)

At ~14 s per answer (and ~12 s for llama.cpp) on 2 cores, a question set is split into jobs of
--offset/--limit questions; the uncovered questions run once per corpus (`--uncovered only`, or with
one of the jobs), and --summarize gives each set's figures from the jobs' --details.

Corpora (each in its own collection, ingested afresh with the default embedder):
  manuals  examples/manuals + examples/questions.jsonl (the shipped Kestrel manuals, 36 questions)
  pydoc    examples/pydoc + examples/pydoc_questions.jsonl (pydoc text of 39 standard-library
           modules, rendered by bench/pydoc_corpus.py; 32 questions), text nobody on the team wrote
  man      17 Debian manual pages of sections 5, 7 and 8 (bench/man_corpus.py, rendered on first use
           into $EDGE_RAG_HOME/bench/man-corpus) + examples/man_questions_heldout.jsonl (24 questions):
           held out only, so `--split test` refuses it and `both` asks its held-out set
  info     561 nodes of the GNU manuals of coreutils, findutils, grep, sed, gzip and diffutils
           (bench/info_corpus.py, rendered from /usr/share/info on first use into
           $EDGE_RAG_HOME/bench/info-corpus) + examples/info_questions_heldout.jsonl (24 questions
           written blind): held out only, like man
  info2    the info corpus again with a second blind set (examples/info_questions_heldout2.jsonl, 24
           questions on other nodes, written before any change that the first set's answers prompted)
           and other uncovered questions: the check on whatever the first set led to
  own      the shipped manuals again, asked in a technician's own words (30 questions written blind in
           session 23, examples/questions_own_words_heldout.jsonl, no fact another set asks), and 20
           uncovered questions near the manuals' domain (examples/questions_uncovered_near.jsonl: half
           about the robot's parts, facts the manuals never give; half general robotics and IT)
Each also gets UNCOVERED questions, which the documents do not answer, and a held-out question set
(examples/*_heldout.jsonl, `--split heldout`) written before the recipe was tuned and never used to
choose it. `--corpus` defaults to manuals,pydoc.

Per question: hybrid retrieval (k=5), then the engine's answer through rag.ask.ask with its gate
(its recipe: passages, answer budget, greedy, repetition penalty), and, with --peer, llama.cpp
(llama-cpp-python, greedy, the same repetition penalty and answer budget) on the GGUF the engine
was built from, fed the very token ids of the same prompt, its raw text scored the same way.

One JSON line per corpus and engine:
  keyword_complete        share of answers holding every expected keyword (the model's own text;
                          rag.eval.keyword_hits: case, spacing and number formatting folded)
  keyword_complete_shown  the same over what the user reads (with the grounding note's quote)
  keyword_complete_first  the same over the first answers (before a degenerate one is asked again)
  retried                 answers asked a second time (rag.ground.degenerate), both sides alike
  keyword_complete_retrieved   the same over questions whose expected source was retrieved
  citation_validity       share of [n] markers the model wrote that name a passage shown to it
  cited_expected_source   share of answers citing (or attributed to) a passage from the expected file
  grounded                share of answers the grounding check accepted (rag.ground)
  refused_uncovered       share of uncovered questions refused (the gate; an answer to a question the gate
                          passed on keywords alone that the passages do not back, rag.ask.refuse_ungrounded;
                          or an answer saying so)
  uncovered_unwarned      share of uncovered questions answered as if covered: neither refused nor followed by
                          the "not backed by the passages" warning (rag.ground: too little of the answer in one
                          passage, or a command no passage holds)
  refused_covered         covered questions the user was told were not covered (same rules; the model's
                          text is still scored in keyword_complete)
  s_per_answer, ttft_ms   means over the answered questions
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.info_corpus import ensure_info_corpus, info_corpus_dir  # noqa: E402
from bench.man_corpus import ensure_man_corpus, man_corpus_dir  # noqa: E402

# corpus -> (documents, the questions the recipe was chosen on; None: held out only); documents None:
# rendered on first use by RENDERED[corpus](), which returns the folder (nothing is written on import)
CORPORA = {
    "manuals": (ROOT / "examples" / "manuals", ROOT / "examples" / "questions.jsonl"),
    "pydoc": (ROOT / "examples" / "pydoc", ROOT / "examples" / "pydoc_questions.jsonl"),
    "man": (None, None),
    "info": (None, None),
    "info2": (None, None),
    "own": (ROOT / "examples" / "manuals", None),
}
RENDERED = {"man": lambda: ensure_man_corpus(man_corpus_dir()), "info": lambda: ensure_info_corpus(info_corpus_dir()),
            "info2": lambda: ensure_info_corpus(info_corpus_dir())}
# questions written after the recipe's first measurements and never used to choose it; man's were
# written blind, before anybody measured answers on that corpus
HELDOUT = {
    "manuals": ROOT / "examples" / "questions_heldout.jsonl",
    "pydoc": ROOT / "examples" / "pydoc_questions_heldout.jsonl",
    "man": ROOT / "examples" / "man_questions_heldout.jsonl",
    "info": ROOT / "examples" / "info_questions_heldout.jsonl",
    "info2": ROOT / "examples" / "info_questions_heldout2.jsonl",
    "own": ROOT / "examples" / "questions_own_words_heldout.jsonl",
}
UNCOVERED = {
    "manuals": ["Who won the football world cup in 1954?", "How do I bake sourdough bread?",
                "What is the capital of Australia?", "How do I sort a list in Python?",
                "Who wrote Pride and Prejudice?", "What is the boiling point of ethanol?"],
    "pydoc": ["Who won the football world cup in 1954?", "How do I bake sourdough bread?",
              "What is the capital of Australia?", "What does error E-214 mean on the Kestrel robot?",
              "Who wrote Pride and Prejudice?", "How tall is Mount Everest?"],
    "man": ["Who won the football world cup in 1954?", "How do I bake sourdough bread?",
            "What is the capital of Australia?", "What does error E-214 mean on the Kestrel robot?",
            "What does Python's difflib.get_close_matches return?", "How tall is Mount Everest?"],
    "info": ["Who won the football world cup in 1954?", "How do I bake sourdough bread?",
             "What is the capital of Australia?", "What does error E-214 mean on the Kestrel robot?",
             "Which file lists the name servers a Debian machine resolves names with?",
             "How tall is Mount Everest?"],
    "info2": ["Which git command shows the commit history of a repository?", "How do I change my login shell?",
              "Which file holds the jobs that cron runs for a user?", "Who painted the Mona Lisa?",
              "How do I make systemd-networkd give an interface a static IP address?",
              "What is the speed of light in a vacuum?",
              # 12 more, near the corpus's domain, written blind after the heading rule and the code rule
              # that the first six led to (session 21): the check on those changes
              "How do I enable a service so it starts at boot with systemctl, and then follow its logs live with "
              "journalctl?",
              "What nftables rule do I need to allow incoming HTTPS traffic on port 443 and drop all other inbound "
              "connections?",
              "How can I pin a Debian package at its installed version with apt-mark so that apt upgrade leaves it alone?",
              "How do I squash my last three commits into one using an interactive git rebase before pushing?",
              "In tmux, how do I split the current window into two panes side by side and move between them with the "
              "keyboard?",
              "How do I create an ed25519 key with ssh-keygen and copy the public key to a remote server so I can log in "
              "without a password?",
              "What crontab line runs a backup script at 2:30 AM every weekday, and where does cron send the script's "
              "output?",
              "How do I set up logrotate so that /var/log/myapp/*.log is rotated weekly, compressed, and only four old "
              "copies are kept?",
              "What single docker command removes all stopped containers, unused networks and dangling images to free "
              "disk space?",
              "Who originally wrote gzip, and in what year was gzip 1.0 first released?",
              "How do I use grep's --json option to print each match as a JSON object that includes the file name and "
              "line number?",
              "How can I check whether the bash shell on my server is still vulnerable to CVE-2014-6271 (Shellshock), "
              "and how do I patch it?"],
    "own": [json.loads(line)["question"] for line in (ROOT / "examples" / "questions_uncovered_near.jsonl")
            .read_text().splitlines() if line.strip()],
}


def corpus_splits(corpora: str, split: str) -> list[tuple[str, str]]:
    """The (corpus, split) sets a run asks, in order: `both` skips the test set of a corpus that has
    none (held out only); asking for it by name is a UsageError."""
    from edge.errors import UsageError

    names = [c for c in corpora.split(",") if c]
    unknown = [c for c in names if c not in CORPORA]
    if unknown or not names:
        raise UsageError(f"--corpus {corpora!r}: unknown corpus {', '.join(unknown) or '(none)'}",
                         fix=f"choose from {', '.join(CORPORA)}")
    heldout_only = [c for c in names if CORPORA[c][1] is None]
    if split == "test" and heldout_only:
        raise UsageError(f"corpus {', '.join(heldout_only)} is held out only: it has no test questions",
                         fix="use --split heldout or both")
    splits = ("test", "heldout") if split == "both" else (split,)
    return [(c, s) for c in names for s in splits if s == "heldout" or CORPORA[c][1] is not None]


def emit(fig: str, **kw) -> None:
    print(json.dumps({"figure": fig, "machine": f"{platform.machine()} {os.cpu_count()} cores", **kw}, default=str),
          flush=True)


class LlamaPeer:
    """llama.cpp on the engine's source GGUF, fed token ids (greedy, same penalty and budget)."""

    def __init__(self, gguf: str, threads: int, n_ctx: int):
        from llama_cpp import Llama

        self.llm = Llama(model_path=gguf, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                         verbose=False)

    def answer(self, ids: list[int], max_tokens: int, repetition_penalty: float) -> tuple[str, float, float]:
        t0 = time.perf_counter()
        ttft = None
        parts = []
        for ev in self.llm.create_completion(prompt=ids, max_tokens=max_tokens, temperature=0.0, top_k=1,
                                             repeat_penalty=repetition_penalty, stream=True):
            if ttft is None:
                ttft = time.perf_counter() - t0
            parts.append(ev["choices"][0]["text"])
        return "".join(parts).strip(), (ttft or 0) * 1e3, time.perf_counter() - t0


def peer_answer(peer: LlamaPeer, tokenizer, prompt, question: str, recipe) -> tuple[str, str | None, float, float]:
    """llama.cpp through ask's own steps: the prompt's ids; a degenerate answer asked again with
    rag.prompt.retry_prompt; copied passage headers cut to their citation. (text, first degenerate
    text or None, ttft ms of the first call, seconds in all)."""
    from rag.ask import prompt_headings
    from rag.ground import degenerate, strip_header_copies
    from rag.prompt import retry_prompt

    text, ttft, s = peer.answer(tokenizer.encode_chat(prompt.messages), prompt.answer_tokens, recipe.repetition_penalty)
    text = strip_header_copies(text).strip()
    if not degenerate(text, question, headings=prompt_headings(prompt)) or not prompt.passages:
        return text, None, ttft, s
    again = retry_prompt(prompt, question, tokenizer)
    text2, _, s2 = peer.answer(tokenizer.encode_chat(again.messages), prompt.answer_tokens, recipe.repetition_penalty)
    return strip_header_copies(text2).strip(), text, ttft, s + s2


def shown_text(text: str, g, prompt, question: str, res, min_coverage: float) -> str:
    """What ask would show for the peer's `text`: refused where the gate passed on keywords alone and
    the passages do not back it; a degenerate answer is replaced by the closest passage's quote; an
    ungrounded one is followed by it (rag.ask)."""
    from rag.ask import NOT_COVERED, prompt_headings, refuse_ungrounded
    from rag.ground import degenerate, fallback_note
    from rag.retrieve import keyword_coverage

    deg = degenerate(text, question, headings=prompt_headings(prompt))
    if refuse_ungrounded(res, replace(g, grounded=g.grounded and not deg), [p.text for p in prompt.passages], question, min_coverage):
        return NOT_COVERED
    if (g.grounded and not deg) or not prompt.passages:
        return text
    best = max(prompt.passages, key=lambda p: keyword_coverage(question, p.text))
    note = fallback_note(question, best.n, best.text, best.hit.chunk.citation(), answered=not deg)
    return note if deg else text + note


def foreign_documents(collection: str, docs: Path) -> int:
    """Documents of `collection` from outside `docs`. ingest keeps every root a collection was given,
    so --reuse-index from another checkout of the repository would add the corpus a second time:
    then every passage is retrieved twice (a session-3 table was measured that way). Such a
    collection is ingested afresh instead (said on stderr)."""
    from rag.ingest import collection_dir
    from rag.store import Store

    d = collection_dir(collection)
    if not (d / "store.sqlite").is_file():
        return 0
    root = docs.resolve()
    with Store(d, readonly=True) as st:
        n = sum(1 for p in st.documents() if not Path(p).is_relative_to(root))
    if n:
        print(f"bench_answers: collection {collection} holds {n} documents from outside {root}: ingested afresh",
              file=sys.stderr)
    return n


def score_text(text: str, n_passages: int, item) -> dict:
    from rag.eval import keyword_hits
    from rag.prompt import all_cited_numbers, cited_numbers

    raw = all_cited_numbers(text)
    valid = [v for v in raw if 1 <= v <= n_passages]
    ok, share = keyword_hits(text, item.keywords)
    return {"keywords_ok": ok, "keyword_share": share, "citations": len(raw), "valid_citations": len(valid),
            "cited": cited_numbers(text, n_passages)}


def refused(text: str) -> bool:
    from rag.ground import refuses

    return refuses(text)


def select_questions(items: list, offset: int = 0, limit: int = 0, ids: str | None = None) -> list:
    """The questions a job asks: `ids` (comma-separated 0-based positions in the set's file, e.g. the
    questions whose prompts a change moved) or all of them, then --offset / --limit over that list."""
    from edge.errors import UsageError

    if ids:
        try:
            pos = [int(x) for x in ids.split(",") if x.strip()]
        except ValueError:
            raise UsageError(f"--ids {ids!r}: not a list of numbers", fix="give positions like --ids 0,4,17") from None
        bad = [i for i in pos if not 0 <= i < len(items)]
        if bad or len(set(pos)) != len(pos):
            raise UsageError(f"--ids {ids!r}: {'positions ' + str(bad) + ' outside' if bad else 'a position twice in'} "
                             f"the set's {len(items)} questions", fix=f"use distinct positions 0-{len(items) - 1}")
        items = [items[i] for i in sorted(pos)]
    items = items[offset:]
    return items[:limit] if limit else items


def summarize(rows: list[dict], uncovered: list[dict]) -> dict:
    n = len(rows)
    ret = [r for r in rows if r["retrieved"]]
    cits = sum(r["citations"] for r in rows)
    out = {
        "n": n,
        "retrieved": len(ret),
        "keyword_complete": round(sum(r["keywords_ok"] for r in rows) / max(n, 1), 4),
        "keyword_complete_retrieved": round(sum(r["keywords_ok"] for r in ret) / max(len(ret), 1), 4),
        "keyword_recall": round(sum(r["keyword_share"] for r in rows) / max(n, 1), 4),
        "citation_validity": round(sum(r["valid_citations"] for r in rows) / cits, 4) if cits else None,
        "answers_citing": round(sum(1 for r in rows if r["citations"]) / max(n, 1), 4),
        "cited_expected_source": round(sum(r["cited_expected"] for r in rows) / max(n, 1), 4),
        "refused_uncovered": round(sum(u["refused"] for u in uncovered) / max(len(uncovered), 1), 4),
        # answered as if covered: neither refused nor followed by the "not backed by the passages" warning
        "uncovered_unwarned": round(sum(not u["refused"] and u.get("grounded", True) for u in uncovered)
                                    / max(len(uncovered), 1), 4),
        "n_uncovered": len(uncovered),
        "refused_covered": sum(bool(r.get("refused")) for r in rows),
        "s_per_answer": round(statistics.mean(r["s"] for r in rows), 2) if rows else None,
        "ttft_ms": round(statistics.mean(r["ttft_ms"] for r in rows), 1) if rows else None,
    }
    if rows and "retried" in rows[0]:
        out["retried"] = sum(bool(r["retried"]) for r in rows)
        # the model's text without the retry of degenerate answers (the recipe before it)
        out["keyword_complete_first"] = round(sum(r["keywords_ok_first"] for r in rows) / n, 4)
    if rows and "keywords_ok_shown" in rows[0]:
        # what the user reads: the model's text plus, when it is ungrounded, the quoted passage
        out["keyword_complete_shown"] = round(sum(r["keywords_ok_shown"] for r in rows) / n, 4)
    if rows and "grounded" in rows[0]:
        out["grounded"] = round(sum(bool(r["grounded"]) for r in rows) / n, 4)
    return out


def summarize_files(paths: list[str]) -> None:
    """One JSON line per corpus, split and engine over the --details of several jobs (a question set
    split by --offset/--limit; the corpus's uncovered questions from whichever job asked them)."""
    meta: dict = {}
    rows: dict = {}
    unc: dict = {}
    for p in paths:
        for line in open(p):
            d = json.loads(line)
            if "meta" in d:
                if d["meta"]["questions"]:
                    meta.setdefault((d["corpus"], d["split"]), []).append({"file": p, **d["meta"]})
            elif d.get("uncovered"):
                key = "engine" if d["engine"] in ("engine", "edge-rag") else d["engine"]
                unc.setdefault((d["corpus"], key), {})[d["question"]] = d
            else:
                key = "engine" if d["engine"] == "edge-rag" else d["engine"]
                rows.setdefault((d["corpus"], d["split"], key), {})[d["question"]] = d
    for (corpus, split, key), by_q in sorted(rows.items()):
        us = list(unc.get((corpus, key), {}).values())
        jobs = meta.get((corpus, split), [])
        same = {k: v for k, v in (jobs[0] if jobs else {}).items() if all(j.get(k) == v for j in jobs)
                and k not in ("file", "offset", "ids", "questions")}
        emit("answers", corpus=corpus, split=split, engine=key, jobs=len(jobs), **same, **summarize(list(by_q.values()), us))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engine", default=None, help="generator bundle (default: the default generator)")
    ap.add_argument("--corpus", default="manuals,pydoc")
    ap.add_argument("--split", default="test", choices=("test", "heldout", "both"),
                    help="the questions the recipe was chosen on (test), the held-out ones, or both")
    ap.add_argument("--reuse-index", action="store_true", help="ingest incrementally (unchanged files are kept; "
                    "the chunks of a file stay as the code that ingested it cut them, so the first job of a "
                    "set after a loader or chunker change runs without it; a collection holding documents "
                    "from another checkout is ingested afresh)")
    ap.add_argument("--peer", action="store_true", help="also llama.cpp on the engine's source GGUF")
    ap.add_argument("--peer-only", action="store_true", help="llama.cpp only (the engine's tokenizer builds the prompts)")
    ap.add_argument("--gguf", default=None, help="the peer's GGUF (default: the engine's source)")
    ap.add_argument("--limit", type=int, default=0, help="first N questions per corpus (0: all)")
    ap.add_argument("--offset", type=int, default=0, help="skip the first N questions (to split a set into jobs)")
    ap.add_argument("--ids", default=None, help="only these questions: comma-separated 0-based positions in the set's "
                    "file (one --corpus and --split; --offset/--limit then apply to them)")
    ap.add_argument("--uncovered", default="yes", choices=("yes", "no", "only"),
                    help="also ask the corpus's uncovered questions (no: a later job of the same set does; only: "
                    "just them)")
    ap.add_argument("--summarize", nargs="+", metavar="DETAILS", default=None,
                    help="merge the --details files of the jobs a set was split into and print its figures")
    ap.add_argument("--passages", type=int, default=0, help="override the recipe's passage count")
    ap.add_argument("--passage-tokens", type=int, default=0)
    ap.add_argument("--max-tokens", type=int, default=0, help="override the recipe's answer budget")
    ap.add_argument("--repetition-penalty", type=float, default=0.0)
    ap.add_argument("--system", default=None, help="override the recipe's system line")
    ap.add_argument("--instruction", default=None, help="override the recipe's instruction line")
    ap.add_argument("-k", type=int, default=5)
    ap.add_argument("--embed-tokens", type=int, default=None,
                    help="ingest with this ChunkParams.embed_tokens (0: the whole chunk; default: the ingest's default); "
                         "its own collection per value")
    ap.add_argument("--embed-overlap", choices=("yes", "no"), default=None,
                    help="ingest with ChunkParams.embed_overlap on or off (default: the ingest's default); its own "
                         "collection per value")
    ap.add_argument("--backend", default="auto", choices=("auto", "onnxruntime", "native"),
                    help="the engine's CPU backend (default: auto, what `ask` runs: native where it runs, see "
                         "edge.runtime.generator.resolve_backend)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--peer-threads", type=int, default=0, help="llama.cpp threads (default --threads; on a loaded "
                    "machine 1 is faster: its threads spin at barriers)")
    ap.add_argument("--details", default=None, help="write per-question rows (JSON lines) here")
    args = ap.parse_args()
    if args.summarize:
        return summarize_files(args.summarize)
    if args.ids and ("," in args.corpus or args.split == "both" or args.uncovered == "only"):
        sys.exit("bench_answers: --ids names questions of one set: give one --corpus and --split test|heldout")
    from edge.errors import EdgeRagError

    try:
        sets = corpus_splits(args.corpus, args.split)
        docs_of = {c: RENDERED[c]() if CORPORA[c][0] is None else CORPORA[c][0] for c, _ in sets}
    except EdgeRagError as e:
        sys.exit(f"bench_answers: {e}")

    from edge.bundle import Bundle
    from edge.models.spec import ModelSpec
    from edge.engines import default_embedder_bundle, default_generator_bundle
    from edge.runtime.embedder import Embedder
    from edge.runtime.generator import Generator
    from edge.runtime.tokenizer import Tokenizer
    from rag.ask import NOT_COVERED, ask, generator_recipe, prompt_headings
    from rag.eval import load_questions, source_matches
    from rag.chunk import ChunkParams
    from rag.ingest import ingest
    from rag.ground import degenerate, ground
    from rag.prompt import build_prompt, cited_numbers, recipe_for
    from rag.retrieve import Retriever

    engine = Path(args.engine) if args.engine else default_generator_bundle(progress=True)
    bundle = Bundle.open(engine, kind="generator", verify=False)
    manifest = bundle.manifest
    gen = None
    if not args.peer_only:
        gen = Generator.from_bundle(engine, backend=args.backend, threads=args.threads)
        args.backend = gen.engine.caps.backend or args.backend  # what `auto` picked, in the rows
        recipe = generator_recipe(gen)
        tokenizer, max_context = gen.tokenizer, int(gen.max_context)
    else:
        recipe = recipe_for(ModelSpec.from_dict(manifest.model).n_params)
        tokenizer = Tokenizer.from_bundle(bundle)
        max_context = int(manifest.limits.max_context)
    over = {}
    if args.passages:
        over["max_passages"] = args.passages
    if args.passage_tokens:
        over["passage_tokens"] = args.passage_tokens
    if args.max_tokens:
        over["answer_tokens"] = args.max_tokens
    if args.repetition_penalty:
        over["repetition_penalty"] = args.repetition_penalty
    if args.system is not None:
        over["system"] = args.system
    if args.instruction is not None:
        over["instruction"] = args.instruction
    recipe = replace(recipe, name=recipe.name + ("+" if over else ""), **over)
    model_name = manifest.model.get("name")
    quant = manifest.quant
    peer = None
    if args.peer or args.peer_only:
        gguf = args.gguf or (manifest.source or {}).get("path")
        if not gguf or not str(gguf).endswith(".gguf") or not Path(gguf).is_file():
            sys.exit(f"no GGUF for the peer ({gguf!r}): pass --gguf")
        peer = LlamaPeer(gguf, args.peer_threads or args.threads, max_context)
    emb_path = default_embedder_bundle(progress=True)
    emb = Embedder.from_bundle(emb_path)
    details = open(args.details, "w", buffering=1) if args.details else None  # line-buffered: a killed run keeps its rows
    meta = dict(model=model_name, quant=quant.recipe, group_size=quant.group_size, recipe=recipe.name,
                passages=recipe.max_passages, passage_tokens=recipe.passage_tokens, answer_tokens=recipe.answer_tokens,
                repetition_penalty=recipe.repetition_penalty, engine_path=str(engine))

    chunking = {} if args.embed_tokens is None else {"embed_tokens": args.embed_tokens or None}
    if args.embed_overlap is not None:
        chunking["embed_overlap"] = args.embed_overlap == "yes"
    params = ChunkParams(**chunking)
    meta["embed_tokens"], meta["embed_overlap"] = params.embed_tokens, params.embed_overlap
    for corpus, split in sets:
        docs, qfile = docs_of[corpus], CORPORA[corpus][1]
        if split == "heldout":
            qfile = HELDOUT[corpus]
        coll = (f"bench-answers-{corpus}" + ("" if args.embed_tokens is None else f"-e{args.embed_tokens}")
                + ("" if args.embed_overlap is None else f"-overlap-{args.embed_overlap}"))
        reuse = args.reuse_index and not foreign_documents(coll, docs)
        rep = ingest(docs, embedder=emb, collection=coll, rebuild=not reuse, progress=False, params=params,
                     embedder_path=str(emb_path))
        items = select_questions(load_questions(qfile), args.offset, args.limit, args.ids) if args.uncovered != "only" else []
        if details:
            details.write(json.dumps({"corpus": corpus, "split": split, "meta": {
                **meta, "threads": args.threads, "peer_threads": args.peer_threads or args.threads,
                "chunks": rep.total_chunks, "offset": args.offset, "ids": args.ids, "questions": len(items)}}) + "\n")
        rows = {"engine": [], "llama.cpp": []}
        unc = {"engine": [], "llama.cpp": []}
        with Retriever(emb, coll) as r:
            for it in items:
                res = r.search(it.question, k=args.k)
                retrieved = any(source_matches(h.chunk.path, e) for h in res.hits for e in it.expected_sources)
                prompt = build_prompt(it.question, res.hits, tokenizer, max_context, None, recipe)
                shown_src = [p.hit.chunk.path for p in prompt.passages]

                def cited_expected(nums: list[int]) -> bool:
                    return any(source_matches(shown_src[n - 1], e) for n in nums for e in it.expected_sources)

                base = {"question": it.question, "retrieved": retrieved,
                        "shown_expected": any(source_matches(s, e) for s in shown_src for e in it.expected_sources),
                        "prompt_tokens": prompt.n_tokens}
                if gen is not None:
                    t0 = time.perf_counter()
                    a = ask(it.question, r, gen, k=args.k, recipe=recipe)  # with the gate: what the user gets
                    s = time.perf_counter() - t0
                    sc = score_text(a.model_text, len(prompt.passages), it)
                    sc["citations"] += len(a.invalid_citations)  # the filter dropped them before the user saw them
                    row = {**base, **sc, "engine": "edge-rag", "backend": args.backend, "answer": a.model_text, "s": s,
                           "first_answer": a.first_text, "retried": a.first_text is not None,
                           "keywords_ok_first": score_text(a.first_text, 1, it)["keywords_ok"] if a.first_text is not None else sc["keywords_ok"],
                           "keywords_ok_shown": score_text(a.text, len(prompt.passages), it)["keywords_ok"],
                           "ttft_ms": a.timings["ttft_ms"], "grounded": a.grounded, "refused": not a.covered,
                           "passed_on": res.passed_on, "top_cosine": res.top_cosine,
                           "cited_expected": cited_expected(a.cited), "shown_citations_valid": True}
                    rows["engine"].append(row)
                    if details:
                        details.write(json.dumps({"corpus": corpus, "split": split, **row}) + "\n")
                if peer is not None:
                    text, first, ttft, s = peer_answer(peer, tokenizer, prompt, it.question, recipe)
                    sc = score_text(text, len(prompt.passages), it)
                    g = ground(text, [p.text for p in prompt.passages], sc["cited"])
                    shown = shown_text(text, g, prompt, it.question, res, r.min_keyword_coverage)
                    row = {**base, **sc, "engine": "llama.cpp", "answer": text, "s": s, "ttft_ms": ttft,
                           "first_answer": first, "retried": first is not None,
                           "keywords_ok_first": score_text(first, 1, it)["keywords_ok"] if first is not None else sc["keywords_ok"],
                           "keywords_ok_shown": score_text(shown, 1, it)["keywords_ok"], "refused": shown == NOT_COVERED,
                           "passed_on": res.passed_on, "top_cosine": res.top_cosine,
                           "grounded": g.grounded and not degenerate(text, it.question,
                                                                     headings=prompt_headings(prompt)),
                           "cited_expected": cited_expected(sc["cited"] or ([g.attributed] if g.attributed else []))}
                    rows["llama.cpp"].append(row)
                    if details:
                        details.write(json.dumps({"corpus": corpus, "split": split, **row}) + "\n")
            for q in UNCOVERED[corpus] if args.uncovered != "no" else []:
                res = r.search(q, k=args.k)
                if not res.relevant:
                    for key in unc:
                        if key == "engine" and gen is None or key == "llama.cpp" and peer is None:
                            continue
                        unc[key].append({"question": q, "refused": True, "by": "gate", "top_cosine": res.top_cosine})
                    continue
                prompt = build_prompt(q, res.hits, tokenizer, max_context, None, recipe)
                info = {"question": q, "passed_on": res.passed_on, "top_cosine": res.top_cosine}
                if gen is not None:
                    a = ask(q, r, gen, k=args.k, recipe=recipe)
                    unc["engine"].append({**info, "refused": not a.covered or refused(a.model_text), "answer": a.model_text, "shown": a.text,
                                          "by": "grounding" if not a.covered else "model", "grounded": a.grounded})
                if peer is not None:
                    text, _, _, _ = peer_answer(peer, tokenizer, prompt, q, recipe)
                    g = ground(text, [p.text for p in prompt.passages], cited_numbers(text, len(prompt.passages)))
                    shown = shown_text(text, g, prompt, q, res, r.min_keyword_coverage)
                    unc["llama.cpp"].append({**info, "refused": shown == NOT_COVERED or refused(text), "answer": text, "shown": shown,
                                             "by": "grounding" if shown == NOT_COVERED else "model",
                                             "grounded": g.grounded and not degenerate(text, q, headings=prompt_headings(prompt))})
            if details:
                for key, us in unc.items():
                    for u in us:
                        details.write(json.dumps({"corpus": corpus, "split": split, "engine": key, "uncovered": True, **u}) + "\n")
        for key, rs in rows.items():
            if not rs and not unc[key]:
                continue
            emit("answers", corpus=corpus, split=split, engine=key, model=model_name, quant=quant.recipe,
                 group_size=quant.group_size, recipe=recipe.name, passages=recipe.max_passages,
                 passage_tokens=recipe.passage_tokens, answer_tokens=recipe.answer_tokens,
                 repetition_penalty=recipe.repetition_penalty,
                 threads=args.threads if key == "engine" else args.peer_threads or args.threads,
                 backend=args.backend if key == "engine" else "llama.cpp",
                 chunks=rep.total_chunks, **summarize(rs, unc[key]))
    if details:
        details.close()


if __name__ == "__main__":
    main()
