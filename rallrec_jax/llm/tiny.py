"""A tiny randomly initialised decoder with a word-level tokenizer, built offline.

It makes every stage that needs an LLM runnable on a laptop in seconds (the quickstart, the
tests) without downloading anything. The folder it writes is an ordinary Hugging Face model
folder, so it goes through exactly the same loading code as a real checkpoint.
"""
import json
import re
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp

from rallrec_jax.llm import hf_io, number_line as number_line_lib
from rallrec_jax.llm.config import LMConfig
from rallrec_jax.llm.model import INIT_STD, Decoder

SPECIALS = ("<unk>", "<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>")
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> "
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}")
BASE_WORDS = "Yes No yes no . , ? ! : ; ' \" ( ) - the a an is of and to in".split()
_WORD = re.compile(r"\w+|[^\w\s]")


def vocabulary(texts, max_words=4000):
  """The most frequent words and punctuation marks of `texts` (ties by first appearance)."""
  counts = {}
  for text in texts:
    for word in _WORD.findall(text):
      counts[word] = counts.get(word, 0) + 1
  ranked = sorted(counts, key=lambda w: -counts[w])
  return list(dict.fromkeys(BASE_WORDS + ranked))[:max_words]


def word_tokenizer(folder, words):
  """Save a word-level fast tokenizer with special tokens and a chat template to `folder`."""
  from tokenizers import Tokenizer, models, pre_tokenizers  # pylint: disable=import-outside-toplevel
  from transformers import PreTrainedTokenizerFast  # pylint: disable=import-outside-toplevel
  vocab = {t: i for i, t in enumerate(dict.fromkeys(list(SPECIALS) + list(words)))}
  core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  core.pre_tokenizer = pre_tokenizers.Sequence(
      [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
  tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>",
                                eos_token="</s>", pad_token="<pad>")
  tok.add_special_tokens({"additional_special_tokens": list(SPECIALS[4:])})
  tok.chat_template = CHAT_TEMPLATE
  tok.save_pretrained(folder)
  # Name the class, or AutoTokenizer picks the model family's own from config.json.
  config_file = Path(folder) / "tokenizer_config.json"
  config = json.loads(config_file.read_text())
  config["tokenizer_class"] = "PreTrainedTokenizerFast"
  config_file.write_text(json.dumps(config, indent=2))
  return tok


def build(folder, texts=(), *, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
          intermediate_size=128, seed=0, max_words=4000, init_std=INIT_STD, number_line=()):
  """Write a random tiny Llama and a tokenizer over the words of `texts` to `folder`.

  Every kernel and the embedding are drawn from N(0, init_std^2) (norm weights are ones): at
  hidden size 64 the default (INIT_STD, 0.02) leaves attention almost uniform, and a larger
  scale (about 1/sqrt(hidden_size)) lets a model this small learn in a few hundred updates.
  `number_line` (low, high) puts the embedding rows of the number tokens low..high on the line
  between the rows of the first and the last (`rallrec_jax.llm.number_line`).
  """
  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  tok = word_tokenizer(folder, vocabulary(texts, max_words))
  vocab_size = len(tok)
  cfg = LMConfig(vocab_size=vocab_size, hidden_size=hidden_size,
                 intermediate_size=intermediate_size, num_layers=num_layers, num_heads=num_heads,
                 num_kv_heads=num_kv_heads, head_dim=hidden_size // num_heads,
                 rms_norm_eps=1e-5, tie_word_embeddings=True, max_position_embeddings=8192,
                 bos_token_id=tok.bos_token_id, eos_token_ids=(tok.eos_token_id,),
                 pad_token_id=tok.pad_token_id, scan_layers="false")
  # Drawn by the unrolled layout's init at any depth: a seed gives the weights it always gave.
  ids = jnp.zeros((1, 1), jnp.int32)
  params = nn.meta.unbox(jax.jit(lambda r: Decoder(cfg).init(r, ids))(jax.random.key(seed)))
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: x if "norm" in jax.tree_util.keystr(path) else x * (init_std / INIT_STD),
      params["params"])
  if number_line:
    ids, positions = number_line_lib.tokens(tok, *number_line)
    params["embed_tokens"]["embedding"] = jnp.asarray(number_line_lib.place(
        params["embed_tokens"]["embedding"], ids, positions))
  hf_io.export(params, cfg, folder)
  return folder
