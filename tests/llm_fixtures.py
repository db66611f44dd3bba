"""Tiny Hugging Face models and a tiny tokenizer, built offline, for the LLM tests."""
import json
from pathlib import Path

import numpy as np

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|> {% endif %}")
WORDS = ("Yes No . , ? the a user will like movie book item rating stars watched read is of and "
         "to in it this that Paris France capital The").split()


def tiny_tokenizer(folder):
  """A word-level tokenizer with a chat template and special tokens, saved to `folder`."""
  from tokenizers import Tokenizer, models, pre_tokenizers  # pylint: disable=import-outside-toplevel
  from transformers import PreTrainedTokenizerFast  # pylint: disable=import-outside-toplevel
  specials = ["<unk>", "<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
  vocab = {t: i for i, t in enumerate(specials + list(dict.fromkeys(WORDS)))}
  core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  core.pre_tokenizer = pre_tokenizers.Sequence(
      [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
  tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>",
                                eos_token="</s>", pad_token="<pad>")
  tok.add_special_tokens({"additional_special_tokens": specials[4:]})
  tok.chat_template = CHAT_TEMPLATE
  tok.save_pretrained(folder)
  # Name the class, or AutoTokenizer picks the model family's own (e.g. Qwen2Tokenizer).
  config_file = Path(folder) / "tokenizer_config.json"
  config = json.loads(config_file.read_text())
  config["tokenizer_class"] = "PreTrainedTokenizerFast"
  config_file.write_text(json.dumps(config, indent=2))
  return tok


def tiny_hf_model(folder, kind="llama", seed=0, scale=0.2, with_tokenizer=True, **overrides):
  """A random tiny transformers model with every weight (biases included) drawn N(0, scale²),
  saved with `save_pretrained` (plus the tiny tokenizer). Returns the torch model in eval mode.
  """
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  sizes = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
               bos_token_id=1, eos_token_id=2, pad_token_id=3)
  sizes.update(overrides)
  config_cls, model_cls = {
      "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
      "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
      "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
  }[kind]
  torch.manual_seed(seed)
  model = model_cls(config_cls(**sizes)).eval()
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + scale * torch.randn(p.shape, generator=gen))
      else:
        p.copy_(scale * torch.randn(p.shape, generator=gen))
  model.save_pretrained(folder)
  if with_tokenizer:
    tiny_tokenizer(folder)
  return model


def random_batch(vocab_size, batch=3, length=12, seed=0, pad_right=(0, 4, 7)):
  """int ids [B, T] and a mask with `pad_right[b]` padding positions at the end of row b."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(4, vocab_size, (batch, length))
  mask = np.ones((batch, length), np.int64)
  for b, pad in enumerate(pad_right[:batch]):
    if pad:
      mask[b, -pad:] = 0
  return ids, mask
