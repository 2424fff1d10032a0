"""Continuous batching: one background thread owns the model and decodes every active request together.

Requests arrive from any thread (`Batcher.submit`). At each step boundary the thread admits waiting requests
into free slots of a `SlotCache` (prefilled together with engine.prefill), samples one token for every active
row (engine.next_tokens, once per group of rows with the same sampling settings), hands each token to its
request's `deliver` callback, retires finished rows, and runs one decoding forward pass over the rest. So a
request that arrives while others are decoding joins them at the next step instead of waiting for them to
finish, and eight clients cost about one forward pass of eight rows per token rather than eight passes.

The slot cache differs from engine.generate's KVCache in one way: every row has its own length. A new
request's keys and values go to positions 0..n-1 of its slot and its next token to position n, whatever the
other rows hold; each row attends to its own first `length` positions only. Active rows are kept in slots
0..rows-1 (a finished row's slot is filled with the last active row), so a step reads a view of the cache,
never a gathered copy.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from chatloop.engine import next_tokens, prefill
from chatloop.model import GPT, KVCache
from chatloop.tokenizer import Tokenizer

Event = tuple[int | None, str | None]
"""What a request receives: (token id, None) per generated token, then (None, finish reason) once:
"stop" (a stop token), "length" (max_tokens or the context), "cancelled", or "error: ..."."""


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    """Tokens to generate at most (the caller keeps prompt + max_tokens within the model's context)."""
    temperature: float = 1.0
    """Temperature; 0 is greedy decoding."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    top_k: int = 0
    """Keep the k most likely tokens (0 keeps all)."""
    min_tokens: int = 0
    """Stop tokens cannot be sampled before this many tokens (benchmarks: every request the same length)."""


@dataclass(eq=False)
class Job:
    prompt: list[int]
    """Prompt token ids (at least one)."""
    sampling: Sampling
    deliver: Callable[[Event], None]
    """Called on the batcher thread with each event; must not block (put it on a queue)."""
    cancelled: threading.Event = field(default_factory=threading.Event)
    """Set by the caller (client gone, stop string seen): the row is retired at the next step."""
    generated: int = 0
    """Tokens sampled so far."""

    def cancel(self) -> None:
        self.cancelled.set()


class QueueFull(Exception):
    """More requests are waiting than the batcher's queue holds."""


class SlotCache(KVCache):
    """A KVCache whose rows (slots) have their own lengths; `update` writes one new position per row."""

    def __init__(self, model: GPT, slots: int, max_len: int, device, dtype: torch.dtype) -> None:
        super().__init__(model.cfg, slots, max_len, device, dtype)
        self.rows = 0
        """Active rows: slots 0..rows-1."""
        self.lengths = torch.zeros(slots, dtype=torch.long, device=device)
        """Positions filled per slot; the next token of a row goes to position lengths[row]."""
        self.end = 0
        """Positions a step reads: the longest active row plus the one being written (set before a step)."""

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v: (rows, G, 1, D) for the step's tokens; returns the cache up to the longest row (+1)."""
        n = self.rows
        index = torch.arange(n, device=k.device)
        pos = self.lengths[:n]
        self.k[layer][index, :, pos] = k[:, :, 0]
        self.v[layer][index, :, pos] = v[:, :, 0]
        return self.k[layer, :n, :, : self.end], self.v[layer, :n, :, : self.end]

    def move(self, src: int, dst: int) -> None:
        """Copy slot src into slot dst (to keep active rows contiguous)."""
        end = int(self.lengths[src])
        self.k[:, dst, :, :end] = self.k[:, src, :, :end]
        self.v[:, dst, :, :end] = self.v[:, src, :, :end]
        self.lengths[dst] = self.lengths[src]


@dataclass
class Stats:
    steps: int = 0
    """Decoding steps run (each samples one token for every active row)."""
    tokens: int = 0
    """Tokens delivered."""
    max_rows: int = 0
    """Most rows sampled together in one step: above 1 means requests were batched."""
    row_steps: int = 0
    """Sum over steps of the rows in the step (row_steps / steps is the mean batch)."""
    admitted: int = 0
    """Requests admitted into a slot."""


class Batcher:
    """The model's owner: a thread that steps every active request together (module docstring)."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, max_batch: int = 16, max_queue: int = 64,
                 seed: int = 0) -> None:
        self.model = model.eval()
        self.stop_ids = tokenizer.stop_ids
        self.pad_id = tokenizer.pad_id
        self.max_batch, self.max_queue = max_batch, max_queue
        param = next(model.parameters())
        self.device = param.device
        self.cache = SlotCache(model, max_batch, model.cfg.max_seq_len, param.device, param.dtype)
        self.generator = torch.Generator(device=param.device).manual_seed(seed)
        self.stats = Stats()
        self._waiting: deque[Job] = deque()
        self._active: list[Job] = []  # row i of the cache serves _active[i]
        self._logits: torch.Tensor | None = None  # (rows, V) next-token logits of the active rows
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="chatloop-batcher", daemon=True)
        self._thread.start()

    # -- called from other threads ------------------------------------------------------------------------

    def submit(self, request: Job) -> None:
        """Queue a request; QueueFull when max_queue requests are waiting already."""
        if not request.prompt:
            raise ValueError("a prompt needs at least one token")
        if len(request.prompt) + request.sampling.max_tokens > self.model.cfg.max_seq_len:
            raise ValueError(f"prompt ({len(request.prompt)}) + max_tokens ({request.sampling.max_tokens}) "
                             f"exceeds the context of {self.model.cfg.max_seq_len}")
        with self._wake:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting already (max_queue {self.max_queue})")
            self._waiting.append(request)
            self._wake.notify()

    def pending(self) -> int:
        """Requests waiting for a slot."""
        return len(self._waiting)

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=30)

    # -- the batcher thread ---------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._closed and not self._waiting and not self._active:
                    self._wake.wait()
                if self._closed:
                    break
                room = self.max_batch - len(self._active)
                admitted = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
            try:
                with torch.no_grad():
                    self._step(admitted)
            except Exception as e:  # a bug or out of memory: fail the requests, keep serving the next ones
                for request in self._active + [r for r in admitted if r not in self._active]:
                    request.deliver((None, f"error: {type(e).__name__}: {e}"))
                self._active, self._logits, self.cache.rows = [], None, 0
        for request in self._active + list(self._waiting):
            request.deliver((None, "cancelled"))

    def _admit(self, requests: list[Job]) -> None:
        """Prefill the new requests together and put them in the next free slots."""
        prompts = [r.prompt for r in requests]
        B, P = len(prompts), max(len(p) for p in prompts)
        tokens = torch.full((B, P), self.pad_id, dtype=torch.long, device=self.device)
        mask = torch.zeros((B, P), dtype=torch.bool, device=self.device)
        for i, p in enumerate(prompts):
            tokens[i, P - len(p):] = torch.tensor(p, device=self.device)
            mask[i, P - len(p):] = True
        scratch = KVCache(self.model.cfg, B, P, self.device, self.cache.k.dtype)
        logits = prefill(self.model, prompts, tokens, mask, scratch)  # (B, V)
        cache = self.cache
        for i, p in enumerate(prompts):
            slot, n = cache.rows + i, len(p)
            cache.k[:, slot, :, :n] = scratch.k[:, i, :, P - n:]
            cache.v[:, slot, :, :n] = scratch.v[:, i, :, P - n:]
            cache.lengths[slot] = n
        cache.rows += B
        self._active += requests
        self._logits = logits if self._logits is None else torch.cat([self._logits, logits])
        self.stats.admitted += B

    def _sample(self) -> torch.Tensor:
        """(rows,) next tokens of the active rows, one engine.next_tokens call per sampling setting."""
        logits = self._logits.float()
        early = [i for i, r in enumerate(self._active) if r.generated < r.sampling.min_tokens]
        if early:
            logits[torch.tensor(early, device=self.device)[:, None], torch.tensor(self.stop_ids, device=self.device)] \
                = float("-inf")
        groups: dict[tuple[float, int, float], list[int]] = {}
        for i, r in enumerate(self._active):
            groups.setdefault((r.sampling.temperature, r.sampling.top_k, r.sampling.top_p), []).append(i)
        if len(groups) == 1:
            (temperature, top_k, top_p), _ = groups.popitem()
            return next_tokens(logits, temperature, top_k, top_p, self.generator)[0]
        out = torch.empty(len(self._active), dtype=torch.long, device=self.device)
        for (temperature, top_k, top_p), rows in groups.items():
            index = torch.tensor(rows, device=self.device)
            out[index] = next_tokens(logits[index], temperature, top_k, top_p, self.generator)[0]
        return out

    def _step(self, admitted: list[Job]) -> None:
        if admitted:
            self._admit(admitted)
        rows = len(self._active)
        stats = self.stats
        stats.steps += 1
        stats.row_steps += rows
        stats.max_rows = max(stats.max_rows, rows)
        chosen = self._sample().tolist()
        keep: list[int] = []
        for i, (request, token) in enumerate(zip(self._active, chosen)):
            request.generated += 1
            if request.cancelled.is_set():
                request.deliver((None, "cancelled"))
            elif token in self.stop_ids:
                request.deliver((None, "stop"))
            else:
                request.deliver((token, None))
                stats.tokens += 1
                if request.generated >= request.sampling.max_tokens:
                    request.deliver((None, "length"))
                else:
                    keep.append(i)
        self._retire(keep)
        if not self._active:
            self._logits = None
            return
        cache = self.cache
        n = cache.rows
        tokens = torch.tensor([chosen[i] for i in keep], device=self.device)[:, None]  # (n, 1)
        positions = cache.lengths[:n, None].clone()
        cache.end = int(positions.max()) + 1
        # Each row sees its own filled positions and the one this step writes: (n, 1, 1, end).
        visible = torch.arange(cache.end, device=self.device)[None, :] <= positions
        self._logits = self.model(tokens, attention_mask=visible[:, None, None, :], position_ids=positions,
                                  cache=cache)[:, -1]
        cache.lengths[:n] += 1

    def _retire(self, keep: list[int]) -> None:
        """Keep only rows `keep` (ascending), moving them to slots 0..len(keep)-1."""
        if len(keep) == len(self._active):
            return
        for new, old in enumerate(keep):
            if new != old:
                self.cache.move(old, new)
        self._active = [self._active[i] for i in keep]
        self.cache.rows = len(keep)
        if keep:
            self._logits = self._logits[torch.tensor(keep, device=self.device)]


class TextStream:
    """A request's tokens as text pieces: incremental decoding and OpenAI `stop` strings.

    Byte-level BPE can split a character over tokens, so the text is re-decoded as a whole and only what is
    final is released: nothing that ends in a half character (U+FFFD), and nothing that could be the start
    of a stop string. When a stop string appears, the text ends before it and `stopped` turns true.
    """

    def __init__(self, tokenizer: Tokenizer, stop: list[str] | None = None) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.ids: list[int] = []
        self.sent = 0  # characters released
        self.stopped = False

    def push(self, token: int) -> str:
        """Add a token; return the text that became final (possibly empty)."""
        self.ids.append(token)
        text = self.tokenizer.decode_reply(self.ids)
        for s in self.stop:
            at = text.find(s, max(0, self.sent - len(s)))
            if at >= 0:
                self.stopped = True
                text = text[:at]
        if self.stopped:
            return self._release(text, len(text))
        end = len(text) - 1 if text.endswith("\ufffd") else len(text)
        for s in self.stop:  # hold back a tail that a stop string could start with
            for k in range(min(len(s) - 1, end - self.sent), 0, -1):
                if text[end - k:end] == s[:k]:
                    end -= k
                    break
        return self._release(text, end)

    def flush(self) -> str:
        """At the end of the response: whatever is still held back."""
        if self.stopped:
            return ""
        text = self.tokenizer.decode_reply(self.ids)
        return self._release(text, len(text))

    def _release(self, text: str, end: int) -> str:
        piece = text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return piece


def collect(batcher: Batcher, tokenizer: Tokenizer, prompt: list[int], sampling: Sampling,
            stop: list[str] | None = None, on_text: Callable[[str], None] | None = None) -> tuple[str, str, int]:
    """Run one request to the end on the calling thread: (text, finish reason, tokens generated).
    on_text receives each final piece as it comes (the terminal chat prints it)."""
    events: queue.Queue[Event] = queue.Queue()
    request = Job(prompt, sampling, events.put)
    batcher.submit(request)
    stream, pieces = TextStream(tokenizer, stop), []
    while True:
        token, finish = events.get()
        if token is not None:
            piece = stream.push(token)
            if stream.stopped:
                request.cancel()
                finish = "stop"
        else:
            piece = stream.flush()
        if piece:
            pieces.append(piece)
            if on_text:
                on_text(piece)
        if finish is not None:
            # After a stop string the batcher still delivers the row's end; wait for it before returning.
            while token is not None:
                token, _ = events.get()
            return "".join(pieces), finish, request.generated
