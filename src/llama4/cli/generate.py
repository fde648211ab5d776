"""`llama4 generate` (one prompt, streamed to stdout) and `llama4 chat` (an interactive multi-turn loop).

Text goes through the checkpoint directory's tokenizer (`tokenizer.model` or `tokenizer.json`), or the
published Llama 4 tokenizer when the directory has none.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TextIO

import torch

from .chat_input import HELP, check_media, line_reader, parse_command
from .common import add_threads, load_model_and_tokenizer, positive_int
from ..generation.engine import DEFAULT_PREFILL_CHUNK, generate_stream
from ..generation.session import ChatSession


def _sampling(args: argparse.Namespace, tokenizer) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                stop_strings=args.stop or None, tokenizer=tokenizer, prefill_chunk=args.prefill_chunk,
                compile=args.compile, kv_dtype=args.kv_dtype)


def _stream_text(model, tokenizer, ids: list[int], args: argparse.Namespace, out: TextIO,
                 pixel_values: torch.Tensor | None = None, session: ChatSession | None = None,
                 interruptible: bool = False) -> str:
    """Write the reply to `out` as it comes; returns its text (without the stop token). With
    `interruptible`, Ctrl-C ends the reply early (what was written so far is returned) instead of the
    program."""
    stops = set(model.config.text.eos_token_id) | set(tokenizer.stop_ids)
    decoder, pieces = tokenizer.stream(), []
    try:
        for tok in generate_stream(model, ids, stop_ids=sorted(stops), pixel_values=pixel_values, session=session,
                                   **_sampling(args, tokenizer)):
            if tok in stops:
                break
            piece = decoder.push(tok)
            pieces.append(piece)
            out.write(piece)
            out.flush()
    except KeyboardInterrupt:
        if not interruptible:
            raise
        print("\n[interrupted]", file=sys.stderr, flush=True)
        if session is not None:  # a layer may have cached the step cut short: the next turn prefills afresh
            session.ids = []
    tail = decoder.flush()
    out.write(tail + "\n")
    out.flush()
    return "".join(pieces) + tail


def cmd_generate(args: argparse.Namespace) -> int:
    model, tokenizer = load_model_and_tokenizer(args)
    pixel_values = None
    if args.image or args.video:  # media live in chat turns: the prompt becomes one user turn
        from ..media.prompt import encode_prompt, user_message

        prompt = encode_prompt(tokenizer, [user_message(args.prompt, args.image, args.video)], model.config,
                               max_tiles=args.max_tiles, num_frames=args.num_frames)
        ids, pixel_values = prompt.ids, prompt.pixel_values
    elif args.chat:
        ids = tokenizer.encode_chat([{"role": "user", "content": args.prompt}])
    else:
        ids = tokenizer.encode(args.prompt, bos=True)
    from ..train.distributed import is_main

    if is_main():
        _stream_text(model, tokenizer, ids, args, sys.stdout, pixel_values)
    else:  # under torchrun every rank runs the same steps; rank 0 writes the text
        with open(os.devnull, "w") as null:
            _stream_text(model, tokenizer, ids, args, null, pixel_values)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """Read a user turn per line until EOF or /exit (/help lists the commands). A turn that cannot be
    sent (a bad file, or too long for --context) is reported and dropped; the conversation goes on.
    The cache carries over between text turns, so each prefills only what the previous ones did not;
    once the conversation holds media, every turn re-encodes it (its pixels go with the whole prompt)."""
    from ..media.prompt import encode_prompt, user_message

    model, tokenizer = load_model_and_tokenizer(args)
    for kind, paths in (("image", args.image), ("video", args.video)):
        for path in paths:
            check_media(kind, path)
    session = ChatSession(model, args.context or min(model.config.text.max_position_embeddings, 32768),
                          kv_dtype=args.kv_dtype)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    images, videos = list(args.image), list(args.video)
    has_media = False
    interactive = sys.stdin.isatty()
    read = line_reader(interactive)
    if interactive:
        print("llama4 chat: /help lists the commands; Ctrl-D or /exit leaves.", file=sys.stderr)

    def say(msg: str) -> None:
        print(f"llama4 chat: {msg}", file=sys.stderr, flush=True)

    while True:
        try:
            line = read()
        except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh prompt, as in a shell
            print(file=sys.stderr)
            continue
        if line is None:
            return 0
        command = parse_command(line)
        if command is not None:
            name, arg = command
            if name == "/exit":
                return 0
            if name == "/help":
                print(HELP, file=sys.stderr, flush=True)
            elif name == "/reset":
                messages = messages[:1] if args.system else []
                images, videos, has_media = [], [], False
            elif name in ("/image", "/video"):
                try:
                    check_media(name[1:], arg)
                except (ValueError, FileNotFoundError, ImportError) as e:
                    say(f"error: {e}; nothing attached")
                    continue
                (images if name == "/image" else videos).append(arg)
                say(f"{name[1:]} {arg} attached to your next message")
            else:
                say(f"unknown command {name}; /help lists them (nothing was sent)")
            continue
        if not line.strip():
            continue
        messages.append(user_message(line, images, videos) if images or videos else {"role": "user", "content": line})
        try:
            if has_media or images or videos:
                prompt = encode_prompt(tokenizer, messages, model.config, max_tiles=args.max_tiles,
                                       num_frames=args.num_frames)
                ids, pixel_values = prompt.ids, prompt.pixel_values
            else:
                ids, pixel_values = tokenizer.encode_chat(messages), None
            needed = len(ids) + args.max_new_tokens
            if needed > session.max_context:
                raise ValueError(f"this message does not fit: the conversation would need {needed:,} positions "
                                 f"({len(ids):,} prompt + {args.max_new_tokens:,} --max-new-tokens) but the chat "
                                 f"holds {session.max_context:,} (--context). Send something shorter, /reset, or "
                                 f"restart with a larger --context")
        except (ValueError, FileNotFoundError) as e:  # say so and keep the conversation as it was
            say(f"error: {e}")
            messages.pop()
            continue
        has_media |= bool(images or videos)
        images, videos = [], []
        try:
            reply = _stream_text(model, tokenizer, ids, args, sys.stdout, pixel_values, session=session,
                                 interruptible=True)
        except ValueError as e:
            say(f"error: {e}")
            messages.pop()
            session.ids = []  # the cache may hold part of this turn: start the next one afresh
            continue
        messages.append({"role": "assistant", "content": reply})


def _media_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", action="append", default=[], help="image file (repeatable)")
    p.add_argument("--video", action="append", default=[], help="video file (repeatable)")
    p.add_argument("--max-tiles", type=int, default=None,
                   help="tiles per image, plus a thumbnail (default: the model's media_config.json, else 16)")
    p.add_argument("--num-frames", type=int, default=None,
                   help="frames sampled per video (default: what the model was trained with, else 8)")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory (config.json + *.safetensors)")
    p.add_argument("--tokenizer", default=None, help="tokenizer file or directory (default: the model's, "
                                                     "else the published Llama 4 tokenizer)")
    # Sampling flags default to the checkpoint's generation_config.json, then to greedy decoding.
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the checkpoint's, else 256")
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: the checkpoint's, else 0)")
    p.add_argument("--top-k", type=int, default=None, help="0 = off")
    p.add_argument("--top-p", type=float, default=None, help="1 = off")
    p.add_argument("--min-p", type=float, default=None, help="0 = off")
    p.add_argument("--repetition-penalty", type=float, default=None, help="1 = off")
    p.add_argument("--adapter", default=None, help="LoRA adapter directory (PEFT format) applied without merging")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--prefill-chunk", type=int, default=DEFAULT_PREFILL_CHUNK,
                   help="prompt tokens per prefill step (bounds activation memory)")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto", help="auto = the checkpoint's")
    p.add_argument("--kv-dtype", choices=["auto", "fp8", "int8"], default="auto",
                   help="the global layers' KV cache: auto = the weights' dtype; fp8 / int8 = one byte per element "
                        "with a scale per position and head (about half of bf16)")
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step with torch.compile (fullgraph); the first token waits for it")
    p.add_argument("--tp", type=positive_int, default=1,
                   help="under torchrun: split attention and dense FFNs over this many ranks")
    p.add_argument("--ep", type=positive_int, default=1,
                   help="under torchrun: split the routed experts over this many ranks")
    add_threads(p)


def add_generate(sub) -> None:
    p = sub.add_parser("generate", help="complete a prompt, streaming the text to stdout")
    _common(p)
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn in the chat format")
    _media_flags(p)  # media imply --chat
    p.set_defaults(func=cmd_generate)


def add_chat(sub) -> None:
    p = sub.add_parser("chat", help="interactive multi-turn chat (one user turn per line; /help, /reset, /exit)")
    _common(p)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--context", type=int, default=None,
                   help="positions the conversation may use (KV cache size; default min(32768, the model's))")
    _media_flags(p)  # attached to the first turn; /image PATH and /video PATH attach to the next
    p.set_defaults(func=cmd_chat)
