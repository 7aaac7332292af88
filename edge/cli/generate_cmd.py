"""Commands: `edge-rag generate "prompt"` (streams the reply) and `edge-rag chat` (multi-turn REPL).

Thin: parse, build SamplingParams (which validates), call edge.runtime.generator, print.
Library imports happen inside the command functions so that `edge-rag --help` stays light.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from edge.cli.app import app

BACKEND_HELP = ("auto (cuda when a usable GPU is present; else native for an int4/int8 llama-family engine on an x86 CPU "
                "with AVX2 and a C compiler; else onnxruntime) | onnxruntime | native (edge-rag's own CPU kernels) | cuda | "
                "tensorrt (untested: Jetson only)")


def _params(max_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop):
    from edge.runtime.sampler import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                          repetition_penalty=repetition_penalty, seed=seed, stop=list(stop or []))


def _generator(engine: Optional[Path], backend: str, threads: Optional[int]):
    from edge.runtime.generator import Generator

    if engine is None:
        from edge.engines import default_generator_bundle

        engine = default_generator_bundle(progress=sys.stderr.isatty())
    return Generator.from_bundle(engine, backend=backend, threads=threads)


# Options shared by both commands (typer needs them spelled out per command).
def _opt_engine():
    return typer.Option(None, "--engine", "-e", help="Generator bundle (default: SmolLM2-135M-Instruct, built on first use).")


@app.command("generate")
def generate(
    prompt: str = typer.Argument(..., help="The prompt. Wrapped in the model's chat template unless --raw."),
    engine: Optional[Path] = _opt_engine(),
    max_tokens: int = typer.Option(256, "--max-tokens", "-n", help="Most tokens to generate."),
    temperature: float = typer.Option(0.7, "--temperature", "-t", help="0 = greedy."),
    top_k: int = typer.Option(0, "--top-k", help="Sample among the k most likely tokens (0 = off)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass in (0, 1] (1 = off)."),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty", help="> 1 discourages repeats (1 = off)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed for reproducible sampling."),
    stop: Optional[List[str]] = typer.Option(None, "--stop", help="Stop string (repeatable); not included in the output."),
    backend: str = typer.Option("auto", "--backend", help=BACKEND_HELP),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for onnxruntime (default: all cores)."),
    raw: bool = typer.Option(False, "--raw", help="Send the prompt as is, without the chat template."),
    truncate: bool = typer.Option(False, "--truncate", help="Keep the end of a prompt longer than the context instead of failing."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object (text + timing stats) instead of streaming."),
) -> None:
    """Generate a reply to PROMPT, streamed to the terminal."""
    params = _params(max_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop)
    gen = _generator(engine, backend, threads)
    request = prompt if raw else [{"role": "user", "content": prompt}]
    if json_out:
        text = gen.generate(request, params, truncate=truncate)
        print(json.dumps({"text": text, **gen.stats.to_dict()}))
        return
    for delta in gen.stream(request, params, truncate=truncate):
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if gen.stats.truncated:
        print(f"(prompt truncated: dropped its first {gen.stats.truncated} tokens)", file=sys.stderr)


@app.command("chat")
def chat(
    engine: Optional[Path] = _opt_engine(),
    system: Optional[str] = typer.Option(None, "--system", help="A system message to start the conversation."),
    max_tokens: int = typer.Option(256, "--max-tokens", "-n", help="Most tokens per reply."),
    temperature: float = typer.Option(0.7, "--temperature", "-t", help="0 = greedy."),
    top_k: int = typer.Option(0, "--top-k", help="0 = off."),
    top_p: float = typer.Option(1.0, "--top-p", help="1 = off."),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty", help="1 = off."),
    seed: Optional[int] = typer.Option(None, "--seed"),
    stop: Optional[List[str]] = typer.Option(None, "--stop", help="Stop string (repeatable)."),
    backend: str = typer.Option("auto", "--backend", help=BACKEND_HELP),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for onnxruntime."),
) -> None:
    """Multi-turn chat in the model's own chat template. /reset forgets the conversation, /exit quits."""
    from edge.errors import ContextLengthError

    params = _params(max_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop)
    gen = _generator(engine, backend, threads)
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    tty = sys.stdin.isatty()
    if tty:
        print(f"chat with {gen.bundle.spec.name or 'the model'} (context {gen.max_context} tokens); /reset, /exit", file=sys.stderr)
    while True:
        if tty:
            sys.stderr.write(">>> ")
            sys.stderr.flush()
        line = sys.stdin.readline()
        if not line:  # EOF
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            messages = list(start)
            print("(conversation reset)", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": text})
        try:
            reply = []
            for delta in gen.stream(messages, params):
                reply.append(delta)
                sys.stdout.write(delta)
                sys.stdout.flush()
        except ContextLengthError as e:
            messages.pop()
            print(f"error: {e} (use /reset)", file=sys.stderr)
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        messages.append({"role": "assistant", "content": "".join(reply)})
