import pytest

from defect_ds.config import LoraConfig, ModelConfig
from defect_ds.model.components import add_lora, load_components, set_trainable
from defect_ds.model.textual_inversion import add_tokens


@pytest.mark.parametrize("mode", ["lora", "full", "frozen"])
def test_one_function_decides_what_trains(tiny_model_dir, mode):
    parts = load_components(ModelConfig(pretrained_dir=str(tiny_model_dir)))
    if mode == "lora":
        add_lora(parts.unet, LoraConfig(rank=2))
    add_tokens(parts.tokenizer, parts.text_encoder, ["sks_dent"], 1, "defect")
    params = set_trainable(parts.unet, parts.text_encoder, mode)
    unet_trainable = [n for n, p in parts.unet.named_parameters() if p.requires_grad]
    text_trainable = [n for n, p in parts.text_encoder.named_parameters() if p.requires_grad]
    assert text_trainable == ["text_model.embeddings.token_embedding.learned_vectors"] or \
        text_trainable == ["embeddings.token_embedding.learned_vectors"]
    assert not any(p.requires_grad for p in parts.vae.parameters())
    if mode == "lora":
        assert unet_trainable and all("lora_A" in n or "lora_B" in n for n in unet_trainable)
    elif mode == "full":
        assert len(unet_trainable) == len(list(parts.unet.parameters()))
    else:
        assert unet_trainable == []
    assert len(params) == len(unet_trainable) + 1
    assert all(p.dtype.is_floating_point and p.element_size() == 4 for p in params)  # fp32 masters
