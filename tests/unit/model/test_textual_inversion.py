import pytest
import torch

from defect_ds.config import ModelConfig
from defect_ds.model.components import load_components, set_trainable
from defect_ds.model.textual_inversion import add_tokens, expand_prompt, learned_embeddings


@pytest.fixture()
def parts(tiny_model_dir):
    return load_components(ModelConfig(pretrained_dir=str(tiny_model_dir)))


def test_new_tokens_start_at_initializer_and_only_they_train(parts):
    tok, te = parts.tokenizer, parts.text_encoder
    original = te.get_input_embeddings().weight.detach().clone()
    add_tokens(tok, te, ["sks_scratch", "sks_crack"], 2, "defect")
    params = set_trainable(parts.unet, te, "frozen")
    assert [p.shape for p in params] == [torch.Size([4, original.shape[1]])]
    init_ids = tok("defect", add_special_tokens=False).input_ids
    expected = original[init_ids].mean(0)
    vectors = learned_embeddings(te, ["sks_scratch", "sks_crack"], 2)
    assert set(vectors) == {"sks_scratch", "sks_crack"}
    torch.testing.assert_close(vectors["sks_crack"][1], expected)

    ids = tok(expand_prompt("a pill with sks_crack", ["sks_scratch", "sks_crack"], 2),
              return_tensors="pt").input_ids
    opt = torch.optim.AdamW(params, lr=0.1, weight_decay=0.0)
    for _ in range(3):
        te(ids)[0].pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    base = te.get_input_embeddings().base.weight
    assert torch.equal(base[: original.shape[0]], original)  # every old row bit-identical
    after = learned_embeddings(te, ["sks_scratch", "sks_crack"], 2)
    assert not torch.allclose(after["sks_crack"], vectors["sks_crack"])  # used in the prompt: trained
    assert torch.equal(after["sks_scratch"], vectors["sks_scratch"])  # not in the prompt: untouched


def test_expand_prompt_only_whole_tokens():
    assert expand_prompt("x sks_a, sks_ab", ["sks_a"], 3) == "x sks_a sks_a_1 sks_a_2, sks_ab"
    assert expand_prompt("x sks_a", ["sks_a"], 1) == "x sks_a"


def test_existing_token_is_refused(parts):
    with pytest.raises(ValueError, match="already in the tokenizer"):
        add_tokens(parts.tokenizer, parts.text_encoder, ["pill</w>"], 1, "defect")
