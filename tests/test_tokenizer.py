import pytest

from chatloop.errors import UserError
from chatloop.tokenizer import EOS, PAD, Tokenizer, TokenizerConfig, train_tokenizer
from tests.conftest import need_module

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Where does the red fox run?"},
    {"role": "assistant", "content": "To the river."},
    {"role": "user", "content": "And the dog?"},
    {"role": "assistant", "content": "It stays on the hill."},
]


def test_special_tokens_and_pad_distinct_from_eos(tokenizer_dir):
    tok = Tokenizer.load(tokenizer_dir)
    assert tok.pad_id != tok.eos_id
    assert tok.decode(tok.encode("The red fox jumps.")) == "The red fox jumps."
    assert tok.encode("a " + EOS) [-1] == tok.eos_id  # special tokens are single ids in text
    assert tok.end_of_turn_id in tok.stop_ids and tok.eos_id in tok.stop_ids
    assert tok.pad_id not in tok.stop_ids


def test_chat_loss_mask_covers_assistant_content_and_end_of_turn_only(tokenizer_dir):
    tok = Tokenizer.load(tokenizer_dir)
    ids, mask = tok.render_chat(CONVERSATION)
    assert len(ids) == len(mask)
    learned = [i for i, m in zip(ids, mask) if m]
    expected = tok.encode(" To the river.") + [tok.end_of_turn_id] + tok.encode(" It stays on the hill.") + [
        tok.end_of_turn_id]
    assert learned == expected
    # Token by token: role tokens, system and user text are never learned.
    for i, m in zip(ids, mask):
        if i in tok.role_ids.values():
            assert not m
    prompt, prompt_mask = tok.render_chat(CONVERSATION[:2], add_generation_prompt=True)
    assert prompt[-1] == tok.role_ids["assistant"] and not any(prompt_mask)
    assert ids[: len(prompt)] == prompt


def test_an_answer_starts_with_the_token_the_word_has_in_the_prompt(tokenizer_dir):
    """The prefix space: "fox" opens the answer as the same token as in "the red fox" of the question (without it,
    a small model must learn a second token for every name it is asked about); decode_reply drops the space."""
    tok = Tokenizer.load(tokenizer_dir)
    question = {"role": "user", "content": "Where does the red fox run?"}
    ids, mask = tok.render_chat([question, {"role": "assistant", "content": "fox runs to the river."}])
    prompt_ids = tok.render_chat([question], add_generation_prompt=True)[0]
    first_answer_token = ids[len(prompt_ids)]
    assert first_answer_token == tok.encode(" fox")[0] and first_answer_token in prompt_ids
    assert tok.decode_reply(ids[len(prompt_ids):-1]) == "fox runs to the river."
    assert tok.decode(ids[len(prompt_ids):-1]) == " fox runs to the river."


def test_a_checkpoint_from_before_the_prefix_space_renders_as_it_was_trained(tokenizer_dir):
    from chatloop.tokenizer import LEGACY_CHAT_TEMPLATE

    new = Tokenizer.load(tokenizer_dir)
    old = Tokenizer(new.hf, chat_template=LEGACY_CHAT_TEMPLATE)
    assert not old.uses_template and old.prefix == ""
    ids, mask = old.render_chat(CONVERSATION)
    learned = [i for i, m in zip(ids, mask) if m]
    assert learned[: len(old.encode("To the river."))] == old.encode("To the river.")
    assert old.decode_reply(old.encode("To the river.")) == "To the river."


def test_transformers_loads_it_and_its_chat_template_renders_the_same_ids(tokenizer_dir):
    transformers = need_module("transformers")
    tok = Tokenizer.load(tokenizer_dir)
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    assert hf.eos_token == EOS and hf.pad_token == PAD
    assert hf.encode("The blue dog runs.", add_special_tokens=False) == tok.encode("The blue dog runs.")
    rendered = hf.apply_chat_template(CONVERSATION, tokenize=True, add_generation_prompt=False)
    if isinstance(rendered, dict) or hasattr(rendered, "input_ids"):
        rendered = rendered["input_ids"]
    assert list(rendered) == tok.render_chat(CONVERSATION)[0]


def test_trains_on_jsonl_and_gzip(tmp_path):
    import gzip
    import json

    data = tmp_path / "docs.jsonl.gz"
    with gzip.open(data, "wt", encoding="utf-8") as f:
        for i in range(200):
            f.write(json.dumps({"text": f"document {i} about foxes and dogs"}) + "\n")
    tok = train_tokenizer(TokenizerConfig(inputs=[str(data)], out=str(tmp_path / "tok"), vocab_size=300))
    assert tok.vocab_size <= 300 and (tmp_path / "tok" / "tokenizer.json").is_file()


@pytest.mark.parametrize(
    "content, message",
    [(None, "file not found"), (b"", "file is empty"), (b"caf\xe9 ol\xe9\n", "not UTF-8"),
     (b'{"text": 1}\n', "field 'text': expected a string")],
)
def test_bad_inputs_are_named(tmp_path, content, message):
    path = tmp_path / ("in.jsonl" if content and content.startswith(b"{") else "in.txt")
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        train_tokenizer(TokenizerConfig(inputs=[str(path)], out=str(tmp_path / "tok")))
    assert not (tmp_path / "tok" / "tokenizer.json").exists()
