"""Byte-level BPE tokenizer: training, special tokens, and chat rendering with loss masks.

The chat format is one special token per role, the content, and an end-of-turn token:

    <|system|>Be brief.<|end|><|user|>Hi<|end|><|assistant|>Hello!<|end|>

The model learns to end its turn with <|end|>, which is therefore a stop token of the engine next to
<|endoftext|> (the end-of-document token of pretraining). The pad token <|pad|> is neither: a model that
saw pad == EOS in training never learns to stop (Huang et al.). tokenizer.json is Hugging Face's own
format and tokenizer_config.json carries the special tokens and a Jinja chat template, so
`PreTrainedTokenizerFast.from_pretrained(dir)` loads it and `apply_chat_template` renders the same ids.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from chatloop.errors import UserError
from chatloop.io import atomic_write_json, atomic_write_text, check_input_file, iter_texts, sha256_file

EOS = "<|endoftext|>"
PAD = "<|pad|>"
END_OF_TURN = "<|end|>"
ROLES = ("system", "user", "assistant")
SPECIAL_TOKENS = [EOS, PAD, END_OF_TURN] + [f"<|{role}|>" for role in ROLES]

# A space starts every message, as SentencePiece's prefix space does for Llama: a word is then the same token at
# the start of an answer as inside a sentence or in the prompt ("Describe Tammouth" -> " Tammouth is ..."), so a
# model copies the name it was asked about instead of mapping it to a second token. (Without it, a 4-layer SFT
# model at temperature 1 answered about the wrong entity in 14% of its answers to held-out prompts; with it 4%,
# and its gold score rose 0.61 -> 0.73: BENCHMARKS.md.) The model writes the space; `decode_reply` drops it.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|> ' + message['content'] + '<|end|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
# Checkpoints written before the prefix space render their chats as they were trained.
LEGACY_CHAT_TEMPLATE = CHAT_TEMPLATE.replace("'|> '", "'|>'")


@dataclass
class TokenizerConfig:
    inputs: list[str] = field(default_factory=list)
    """Text files to learn from: .txt (one document), .jsonl with a text field (a document per line), .gz."""
    out: str = "runs/tokenizer"
    """Directory to write tokenizer.json and tokenizer_config.json into."""
    vocab_size: int = 4096
    """Vocabulary size including the 256 byte tokens and the special tokens."""
    min_frequency: int = 2
    """A pair must occur this often to be merged."""
    text_field: str = "text"
    """Field holding the document in .jsonl inputs."""
    max_chars: int = 50_000_000
    """Stop reading inputs after this many characters (BPE statistics saturate long before)."""


class Tokenizer:
    """A Hugging Face `tokenizers` BPE plus chatloop's special tokens and chat rendering."""

    def __init__(self, hf: HFTokenizer, eos_token: str = EOS, pad_token: str = PAD,
                 chat_template: str | None = CHAT_TEMPLATE, bos_token: str | None = None) -> None:
        self.hf = hf
        self.eos_token, self.pad_token, self.bos_token = eos_token, pad_token, bos_token
        self.chat_template = chat_template
        self.eos_id = self._id(eos_token)
        self.pad_id = self._id(pad_token)
        self.role_ids = {role: hf.token_to_id(f"<|{role}|>") for role in ROLES}
        self.prefix = " " if chat_template == CHAT_TEMPLATE else ""
        """What chatloop's chat format puts before every message's content (see CHAT_TEMPLATE)."""
        self._template = None
        if self.uses_template:
            self.end_of_turn_id = self._template_end_of_turn()
        else:
            self.end_of_turn_id = hf.token_to_id(END_OF_TURN)

    @property
    def uses_template(self) -> bool:
        """Whether chats are rendered by the checkpoint's own Jinja template (an imported model's) rather than
        chatloop's role tokens."""
        return bool(self.chat_template) and self.chat_template not in (CHAT_TEMPLATE, LEGACY_CHAT_TEMPLATE)

    def _id(self, token: str) -> int:
        token_id = self.hf.token_to_id(token)
        if token_id is None:
            raise UserError(f"tokenizer has no token {token!r}")
        return token_id

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    @property
    def stop_ids(self) -> list[int]:
        """Tokens that end a response: end of turn (chat) and end of text."""
        return list(dict.fromkeys(i for i in (self.end_of_turn_id, self.eos_id) if i is not None))

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def encode_reply(self, text: str) -> list[int]:
        """A message's content as chatloop's chat renders it after the role token: for an answer, the tokens the
        model writes."""
        return self.encode(self.prefix + text)

    def decode_reply(self, ids: list[int]) -> str:
        """The text of a generated answer: without the space chatloop's chat format starts a message with."""
        return self.decode(ids).removeprefix(self.prefix)

    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = False
                    ) -> tuple[list[int], list[bool]]:
        """Token ids of a conversation and a mask that is True on what the model must learn to write:
        the content of assistant turns and their end-of-turn token (never the role tokens or user text)."""
        if self.uses_template:
            return self._render_with_template(messages, add_generation_prompt)
        if self.end_of_turn_id is None:
            raise UserError("this tokenizer has neither chatloop's chat tokens nor a chat template")
        ids: list[int] = []
        mask: list[bool] = []
        for message in messages:
            role = message["role"]
            if role not in self.role_ids:
                raise UserError(f"unknown chat role {role!r}; expected one of {', '.join(ROLES)}")
            content = self.encode_reply(message["content"]) + [self.end_of_turn_id]
            ids += [self.role_ids[role]] + content
            mask += [False] + [role == "assistant"] * len(content)
        if add_generation_prompt:
            ids.append(self.role_ids["assistant"])
            mask.append(False)
        return ids, mask

    # ------------------------------------------------------------ an imported checkpoint's Jinja template

    def _render_text(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        """The template's text for a conversation (Hugging Face's apply_chat_template environment)."""
        if self._template is None:
            from jinja2 import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message: str) -> None:
                raise UserError(f"chat template: {message}")

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
            env.globals["raise_exception"] = raise_exception
            env.globals["strftime_now"] = lambda fmt: time.strftime(fmt)  # Llama 3.1's templates date the system turn
            try:
                self._template = env.from_string(self.chat_template or "")
            except TemplateError as e:
                raise UserError(f"the checkpoint's chat template is not valid Jinja ({e})") from None
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         eos_token=self.eos_token, bos_token=self.bos_token or "")
        except UserError:
            raise
        except Exception as e:  # a template's own errors (undefined names, type errors)
            raise UserError(f"the checkpoint's chat template failed to render ({type(e).__name__}: {e})") from None

    def _template_end_of_turn(self) -> int:
        """The token the template writes right after an assistant's answer (ChatML's <|im_end|>, Llama 3's
        <|eot_id|>): the model's stop token in chat. When that is not a special token, end of text."""
        probe = "chatloop probe answer"
        try:
            text = self._render_text([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": probe}],
                                     False)
        except UserError:
            return self.eos_id
        at = text.find(probe)
        after = self.hf.encode(text[at + len(probe):], add_special_tokens=False).ids if at >= 0 else []
        specials = {t.content for t in self.hf.get_added_tokens_decoder().values() if t.special}
        if after and self.hf.id_to_token(after[0]) in specials:
            return after[0]
        return self.eos_id

    def _render_with_template(self, messages: list[dict[str, str]], add_generation_prompt: bool
                              ) -> tuple[list[int], list[bool]]:
        """Render with an imported checkpoint's own Jinja template.

        The loss mask comes from character spans: an assistant turn is what rendering messages[:i+1] adds
        to rendering messages[:i] with the generation prompt, up to and including the end-of-turn token (what
        the template writes after it, e.g. ChatML's newline, is never sampled, so it is not learned). A template
        that does not render prefix-stably (the answer is not a suffix of what came before, or a later turn
        rewrites an earlier one) is refused: its masks, and the prompts RM and PPO build, would be wrong. With
        add_generation_prompt the same check is made for the answer to come, so that the prompt a policy
        continues is the one its answers were trained after.
        """
        text = self._render_text(messages, add_generation_prompt)
        end_text = self.hf.id_to_token(self.end_of_turn_id) if self.end_of_turn_id is not None else None
        spans = []
        for i, message in enumerate(messages):
            if message["role"] == "assistant":
                before, through = self._render_text(messages[:i], True), self._render_text(messages[: i + 1], False)
                if not text.startswith(through) or not through.startswith(before):
                    raise UserError(f"the checkpoint's chat template does not render conversations prefix-stably "
                                    f"(assistant turn {i + 1}: the conversation before it with the generation "
                                    "prompt is not a prefix of the conversation through it); its loss masks "
                                    "would be wrong")
                stop = through.find(end_text, len(before)) if end_text else -1
                spans.append((len(before), stop + len(end_text) if stop >= 0 else len(through)))
        if add_generation_prompt:
            answered = self._render_text([*messages, {"role": "assistant", "content": "chatloop probe"}], False)
            if not answered.startswith(text):
                raise UserError("the checkpoint's chat template does not render conversations prefix-stably (its "
                                "generation prompt is not what precedes an assistant answer)")
        encoding = self.hf.encode(text, add_special_tokens=False)
        mask = [any(start <= a < end for start, end in spans) for a, _ in encoding.offsets]
        return encoding.ids, mask

    def save(self, out_dir: str | Path) -> None:
        out_dir = Path(out_dir)
        atomic_write_text(out_dir / "tokenizer.json", self.hf.to_str())
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "bos_token": self.bos_token,
            "unk_token": None,
            "model_max_length": 1_000_000,
            "clean_up_tokenization_spaces": False,
            "additional_special_tokens": [t for t in SPECIAL_TOKENS if t not in (self.eos_token, self.pad_token)
                                          and self.hf.token_to_id(t) is not None],
        }
        if self.chat_template:
            config["chat_template"] = self.chat_template
        atomic_write_json(out_dir / "tokenizer_config.json", config)

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise UserError(f"{directory}: no tokenizer.json (expected a tokenizer or checkpoint directory)")
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as e:  # the Rust library raises plain Exceptions
            raise UserError(f"{path}: not a valid tokenizer file ({e})") from None
        cfg_path = directory / "tokenizer_config.json"
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{cfg_path}: not valid JSON ({e})") from None

        def token(name: str, default: str | None) -> str | None:
            value = cfg.get(name, default)
            return value.get("content") if isinstance(value, dict) else value

        eos = token("eos_token", EOS)
        pad = token("pad_token", None) or eos  # imported tokenizers often have no pad; masks make it harmless
        return cls(hf, eos_token=eos, pad_token=pad, chat_template=read_chat_template(directory, cfg),
                   bos_token=token("bos_token", None))


def read_chat_template(directory: Path, tokenizer_config: dict) -> str | None:
    """The chat template of a checkpoint: chat_template.jinja (what transformers writes since 4.50), else
    tokenizer_config.json's chat_template (a string, or a list of named templates: the one named "default")."""
    path = directory / "chat_template.jinja"
    if path.is_file():
        return path.read_text(encoding="utf-8")
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if "default" not in named:
            raise UserError(f"{directory}/tokenizer_config.json: chat_template is a list without a 'default' "
                            f"template (names: {', '.join(map(str, named))})")
        template = named["default"]
    if template is not None and not isinstance(template, str):
        raise UserError(f"{directory}/tokenizer_config.json: chat_template: expected a string")
    return template


def _texts(cfg: TokenizerConfig) -> Iterator[str]:
    budget = cfg.max_chars
    for path in cfg.inputs:
        for text in iter_texts(path, cfg.text_field):
            yield text[:budget]
            budget -= len(text)
            if budget <= 0:
                return


def train_tokenizer(cfg: TokenizerConfig) -> Tokenizer:
    """Learn a byte-level BPE from `cfg.inputs` and save it to `cfg.out`."""
    if not cfg.inputs:
        raise UserError("--inputs: give at least one text file (.txt, .jsonl, .gz)")
    for path in cfg.inputs:
        check_input_file(path)
    if cfg.vocab_size < 256 + len(SPECIAL_TOKENS):
        raise UserError(f"--vocab_size: expected at least {256 + len(SPECIAL_TOKENS)} (bytes + special tokens)")
    start = time.perf_counter()
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(_texts(cfg), trainer)
    tok = Tokenizer(hf)
    out = Path(cfg.out)
    tok.save(out)
    atomic_write_json(out / "tokenizer_lineage.json", {
        "inputs": [{"path": str(p), "sha256": sha256_file(p)} for p in cfg.inputs],
        "config": cfg.__dict__,
    })
    print(f"tokenizer: {tok.vocab_size} tokens from {len(cfg.inputs)} file(s) in "
          f"{time.perf_counter() - start:.1f}s -> {out}/tokenizer.json")
    return tok
