"""Our checkpoints open in transformers with the same logits, and transformers' open in chatloop."""

import json

import pytest
import torch

from tests.conftest import need_module

transformers = need_module("transformers")

from chatloop.checkpoint import load_model, read_lineage, save_model  # noqa: E402
from chatloop.errors import UserError  # noqa: E402
from chatloop.model import GPT, GPTConfig, position_ids_from_mask  # noqa: E402
from chatloop.tokenizer import Tokenizer  # noqa: E402

VOCAB = 320


def random_model(**kw) -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=VOCAB, n_layer=2, n_head=4, d_model=64, max_seq_len=64, **kw)
    model = GPT(cfg).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return model


CASES = {
    "llama": dict(style="llama", n_kv_head=2),
    "llama-untied": dict(style="llama", n_kv_head=2, tie_embeddings=False),
    "qwen2-qkv-bias": dict(style="llama", n_kv_head=2, qkv_bias=True),
    "gpt2": dict(style="gpt2"),
}


def batch():
    """Three rows, one left-padded, and the position ids that count real tokens only (passed to
    transformers explicitly: its GPT-2 would otherwise number the padding too)."""
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (3, 20))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    return ids, mask, position_ids_from_mask(mask)


@pytest.mark.parametrize("case", list(CASES))
def test_our_checkpoint_opens_in_transformers_with_the_same_logits(case, tmp_path, tokenizer_dir):
    model = random_model(**CASES[case])
    save_model(model, tmp_path, Tokenizer.load(tokenizer_dir), lineage={"stage": "test"})
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids, mask, positions = batch()
    with torch.no_grad():
        ours = model(ids, attention_mask=mask)
        theirs = hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        reloaded = load_model(tmp_path)(ids, attention_mask=mask)
    real = mask.bool()
    assert (ours - theirs)[real].abs().max().item() < 1e-4
    assert torch.equal(ours, reloaded)
    assert read_lineage(tmp_path)["stage"] == "test"
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf_tok.pad_token_id != hf_tok.eos_token_id


@pytest.mark.parametrize("style", ["llama", "gpt2"])
def test_scalar_head_opens_as_sequence_classification_with_the_same_scores(style, tmp_path, tokenizer_dir):
    model = random_model(style=style, head="scalar")
    tok = Tokenizer.load(tokenizer_dir)
    save_model(model, tmp_path, tok)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 200, (3, 12))  # ids below the special tokens: no accidental pad
    with torch.no_grad():
        ours = model(ids)[:, -1]
        theirs = hf(input_ids=ids).logits[:, 0]
    assert (ours - theirs).abs().max().item() < 1e-4


def hf_tiny(model_type: str):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    if model_type == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, tie_word_embeddings=False))
    if model_type == "mistral":
        return transformers.MistralForCausalLM(transformers.MistralConfig(**common, sliding_window=32))
    if model_type == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common, tie_word_embeddings=True))
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4,
                                                                n_positions=64))


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "gpt2"])
def test_import_of_transformers_checkpoints_matches_logits(model_type, tmp_path):
    torch.manual_seed(0)
    hf = hf_tiny(model_type).eval()
    for p in hf.parameters():
        torch.nn.init.normal_(p, std=0.1)
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path).eval()
    ids, mask, positions = batch()
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        mine = ours(ids, attention_mask=mask)
    assert (mine - theirs)[mask.bool()].abs().max().item() < 1e-4
    if model_type == "mistral":
        assert ours.cfg.max_seq_len == 32  # context capped at the sliding window, where it is exact


def test_a_checkpoint_missing_a_file_or_tensor_is_refused_by_name(tmp_path):
    model = random_model(style="llama")
    save_model(model, tmp_path, None)
    (tmp_path / "model.safetensors").rename(tmp_path / "moved")
    with pytest.raises(UserError, match="model.safetensors is missing"):
        load_model(tmp_path)
    (tmp_path / "moved").rename(tmp_path / "model.safetensors")
    (tmp_path / "config.json").unlink()
    with pytest.raises(UserError, match="no config.json"):
        load_model(tmp_path)
    with pytest.raises(UserError, match="checkpoint directory not found"):
        load_model(tmp_path / "nope")


def test_architectures_that_cannot_be_imported_are_refused(tmp_path):
    save_model(random_model(style="llama"), tmp_path, None)
    config = json.loads((tmp_path / "config.json").read_text())
    for change, message in [
        ({"model_type": "bert"}, "model_type 'bert' cannot be imported"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope scaling"),
        ({"mlp_bias": True}, "mlp_bias"),
    ]:
        (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(UserError, match=message):
            load_model(tmp_path)


def test_an_lm_checkpoint_loads_as_a_reward_model_with_a_fresh_head(tmp_path):
    model = random_model(style="llama")
    save_model(model, tmp_path, None)
    rm = load_model(tmp_path, head="scalar")
    assert rm.lm_head is None and rm.score is not None
    torch.testing.assert_close(rm.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)
