"""Tokenizer glue: AutoTokenizer from a local folder (offline), chat prompts, answer tokens."""
import json
from pathlib import Path

from rallrec_jax.llm.config import CheckpointError


GENERIC_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend")


def load(folder):
  """The folder's tokenizer, never touching the network; left padding for generation.

  A tokenizer_config.json that names the generic fast class is loaded as that class:
  AutoTokenizer would otherwise pick the model family's own tokenizer from config.json.
  """
  import transformers  # pylint: disable=import-outside-toplevel
  folder = Path(folder)
  config_file = folder / "tokenizer_config.json"
  if not (folder / "tokenizer.json").is_file() and not config_file.is_file():
    raise CheckpointError(f"{folder}: no tokenizer.json or tokenizer_config.json")
  declared = json.loads(config_file.read_text()).get("tokenizer_class") if (
      config_file.is_file()) else None
  cls = (transformers.PreTrainedTokenizerFast if declared in GENERIC_CLASSES
         else transformers.AutoTokenizer)
  tok = cls.from_pretrained(str(folder), local_files_only=True)
  tok.padding_side = "left"
  if tok.pad_token is None:
    tok.pad_token = tok.eos_token
  return tok


def chat_prompt(tokenizer, user_text, system=None):
  """`user_text` in the model's chat template, ending with the assistant prefix.

  Tokenizers without a chat template get the text itself.
  """
  if not getattr(tokenizer, "chat_template", None):
    return user_text
  messages = ([{"role": "system", "content": system}] if system else []) + [
      {"role": "user", "content": user_text}]
  return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def answer_token(tokenizer, prefix, answer):
  """Id of the first token of `answer` as it is tokenised right after `prefix`.

  Resolving it in context (not from a hard-coded table) gives the id the model really
  predicts: "Yes" after the assistant prefix may differ from " Yes" or "Yes" at a string start.
  """
  base = tokenizer(prefix, add_special_tokens=False).input_ids
  full = tokenizer(prefix + answer, add_special_tokens=False).input_ids
  if full[:len(base)] != base or len(full) == len(base):
    raise ValueError(f"cannot isolate the first token of {answer!r} after the prompt prefix")
  return full[len(base)]


def yes_no_tokens(tokenizer, user_text="Is this right?"):
  """(yes_id, no_id): the first answer tokens of "Yes." and "No." after the assistant prefix."""
  prefix = chat_prompt(tokenizer, user_text)
  yes, no = answer_token(tokenizer, prefix, "Yes."), answer_token(tokenizer, prefix, "No.")
  if yes == no:
    raise ValueError("'Yes.' and 'No.' start with the same token")
  return yes, no
