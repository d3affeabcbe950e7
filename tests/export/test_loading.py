"""load_base_model: local folders (with licence from the card) and clear errors."""

from __future__ import annotations

import pytest
import torch
from _export_helpers import tiny_tokenizer
from transformers import GPT2Config, LlamaConfig, LlamaForCausalLM

from slimgpt_core.loading import UnsupportedModelError, load_base_model


def test_local_folder_loads_with_tokenizer_and_card_license(tmp_path):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=1)).eval()
    model.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    (tmp_path / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny\n")
    loaded, tok, info = load_base_model(str(tmp_path), dtype="float32")
    assert info["kind"] == "folder" and info["license"] == "apache-2.0"
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    assert tok("w5").input_ids == [5]


def test_non_llama_layout_is_rejected_by_name(tmp_path):
    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="'gpt2'.*not supported.*llama, mistral"):
        load_base_model(str(tmp_path))


def test_missing_gguf_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="GGUF file"):
        load_base_model(str(tmp_path / "nope.gguf"))
