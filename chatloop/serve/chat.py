"""`chatloop chat`: talk to a checkpoint in the terminal, the reply streamed as it is sampled.

Slash commands: /reset (forget the conversation), /temperature T, /system TEXT (empty clears it), /help,
/quit. The model runs in-process behind the same batcher as `chatloop serve`, and nothing is logged.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from chatloop.errors import UserError
from chatloop.serve.batcher import Batcher, Sampling, collect
from chatloop.tokenizer import Tokenizer

HELP = """commands:
  /reset            forget the conversation (the system prompt stays)
  /temperature T    sampling temperature (0 = greedy)
  /system TEXT      set the system prompt (no TEXT clears it); the conversation restarts
  /help             this list
  /quit             leave (so does Ctrl-D)"""


@dataclass
class ChatConfig:
    model: str = ""
    """Checkpoint directory (chatloop or transformers format, with tokenizer.json)."""
    system: str = ""
    """System prompt to start with (/system changes it)."""
    temperature: float = 0.8
    """Sampling temperature (/temperature changes it); 0 is greedy decoding."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    max_tokens: int = 256
    """Most tokens per reply (fewer when the context is nearly full)."""
    device: str = "auto"
    """"auto", "cpu" or "cuda"."""
    seed: int = 0
    """Seed of the sampler."""


def chat(cfg: ChatConfig) -> None:
    from chatloop.checkpoint import load_model
    from chatloop.device import resolve_device

    if not cfg.model:
        raise UserError("--model: give a checkpoint directory")
    if cfg.temperature < 0:
        raise UserError(f"--temperature: expected a number >= 0, got {cfg.temperature}")
    model = load_model(cfg.model, device=resolve_device(cfg.device))
    tokenizer = Tokenizer.load(Path(cfg.model))
    batcher = Batcher(model, tokenizer, max_batch=1, max_queue=1, seed=cfg.seed)
    system, temperature = cfg.system, cfg.temperature
    history: list[dict[str, str]] = []
    context = model.cfg.max_seq_len
    print(f"chatloop chat: {cfg.model} (context {context} tokens). /help lists the commands.")
    try:
        while True:
            try:
                line = input("you> ").strip()
            except EOFError:
                print()
                break
            if not line:
                continue
            if line.startswith("/"):
                command, _, arg = line.partition(" ")
                arg = arg.strip()
                if command == "/quit":
                    break
                if command == "/reset":
                    history = []
                    print("(conversation reset)")
                elif command == "/temperature":
                    try:
                        value = float(arg)
                        if value < 0:
                            raise ValueError
                        temperature = value
                        print(f"(temperature {temperature:g})")
                    except ValueError:
                        print(f"(expected a number >= 0, got {arg!r}; temperature stays {temperature:g})")
                elif command == "/system":
                    system, history = arg, []
                    print(f"(system prompt {'set' if arg else 'cleared'}; conversation reset)")
                elif command == "/help":
                    print(HELP)
                else:
                    print(f"(unknown command {command}; /help lists them)")
                continue
            history.append({"role": "user", "content": line})
            while True:  # forget the oldest turns when the conversation outgrows the context
                messages = ([{"role": "system", "content": system}] if system else []) + history
                ids = tokenizer.render_chat(messages, add_generation_prompt=True)[0]
                if len(ids) < context or len(history) == 1:
                    break
                history = history[2:]
                print("(the conversation is longer than the context: the oldest turn is forgotten)")
            room = context - len(ids)
            if room < 1:
                history.pop()
                print(f"(that message is longer than the model's context of {context} tokens)")
                continue
            sampling = Sampling(max_tokens=min(cfg.max_tokens, room), temperature=temperature, top_p=cfg.top_p)
            print("bot> ", end="", flush=True)
            text, finish, _ = collect(batcher, tokenizer, ids, sampling,
                                      on_text=lambda piece: print(piece, end="", flush=True))
            print(" [...]" if finish == "length" else "")
            if finish.startswith("error"):
                print(f"({finish})", file=sys.stderr)
                history.pop()
            else:
                history.append({"role": "assistant", "content": text})
    finally:
        batcher.close()
