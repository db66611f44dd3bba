"""Item descriptions by the LLM, appended to descriptions.jsonl as they are generated.

A run killed midway resumes where it stopped: finished batches are on disk (flushed and
fsynced after each batch), a torn last line is dropped, and only missing items are generated.
Sampling is seeded per batch from the batch's first item, so the text does not depend on
where a run was interrupted.
"""
import json
import os
import re
from pathlib import Path

from rallrec_jax import progress as progress_lib
from rallrec_jax.llm import generate
from rallrec_jax.text import templates

_SPACE = re.compile(r"\s+")
_QUOTES = str.maketrans("", "", "\"'\u201c\u201d\u2018\u2019`")


def clean(text, max_words=80):
  """One line, no quotes, at most `max_words` words."""
  words = _SPACE.sub(" ", text.translate(_QUOTES)).strip().split(" ")
  return " ".join(words[:max_words])


def read_done(path):
  """{item id: text} of the complete lines in `path`; a torn last line is cut off the file."""
  path = Path(path)
  done = {}
  if not path.is_file():
    return done
  good_bytes = 0
  with open(path, "rb") as f:
    for line in f:
      try:
        row = json.loads(line)
        done[int(row["item"])] = row["text"]
      except (ValueError, KeyError, TypeError):
        break
      if not line.endswith(b"\n"):
        break
      good_bytes += len(line)
  if good_bytes != path.stat().st_size:
    with open(path, "r+b") as f:
      f.truncate(good_bytes)
  return done


def describe(lm, items, dataset, path, *, batch_size=16, max_new_tokens=128, temperature=0.8,
             top_p=0.9, seed=0, max_words=80, progress=True):
  """Generate a description for every item of `items` missing from `path`; returns all texts.

  `items` are the dicts of data/items.jsonl (with "id"). Returns {item id: text}.
  """
  done = read_done(path)
  todo = [it for it in items if it["id"] not in done]
  bar = progress_lib.bar(total=len(items), initial=len(items) - len(todo), unit="item",
                         desc="describe", disable=not progress)
  with open(path, "a", encoding="utf-8") as f:
    for i in range(0, len(todo), batch_size):
      batch = todo[i:i + batch_size]
      prompts = [templates.description_prompt(it, dataset) for it in batch]
      texts = generate.generate_text(lm, prompts, max_new_tokens=max_new_tokens,
                                     temperature=temperature, top_p=top_p,
                                     seed=seed * 1_000_003 + batch[0]["id"],
                                     batch_size=batch_size, chat=True)
      for it, text in zip(batch, texts):
        done[it["id"]] = clean(text, max_words) or clean(templates.plain_text(it, dataset))
        f.write(json.dumps({"item": it["id"], "text": done[it["id"]]}, ensure_ascii=False) + "\n")
      f.flush()
      os.fsync(f.fileno())
      bar.update(len(batch))
  bar.close()
  return done
