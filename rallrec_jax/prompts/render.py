"""Prompts as token ids: rendering, chat wrapping, answer masks and fitting to a length budget.

Loss mask: 1 exactly on the tokens of the answer text ("Yes." or "No.") as the tokenizer splits
it right after the prompt; the chat template's end-of-turn token is not appended, so the model
learns the answer and nothing else (PAPER.md step 9).

Fitting: when a prompt is longer than `max_length` tokens, history items are dropped, never the
profile, instructions or question. Which end of the list goes first depends on the retrieval
order (`DROP`): orders listing items oldest first drop the oldest; "high" drops the least
similar (the last); "rerank" drops from the end, so the recency fillers go before the
retrieved items, and of those the oldest goes first.
"""
import numpy as np

from rallrec_jax.llm.tokenizer import chat_prompt
from rallrec_jax.prompts import item_stats as item_stats_lib, templates, user_lifetime

DROP = {"simple": "first", "sequential": "first", "fusion": "first", "high": "last",
        "rerank": "last"}
# The finetune keys that decide a prompt's wording beyond the paper's (`build_examples`).
WORDING = ("item_stats", "user_stats", "user_lifetime_stats", "genres", "item_popularity")
MARK = " *"  # follows the title of a listed item close to the target (`close_marks`)


def wording(finetune):
  """{key: bool} of the WORDING keys of a finetune config section (a ConfigDict or a dict read
  from a workdir's config.json, where keys added later are absent: False)."""
  return {key: bool(finetune.get(key, False)) for key in WORDING}


def close_option(finetune, vectors):
  """`build_examples`' `close` of a finetune config section (a ConfigDict or a dict read from
  a workdir's config.json): (unit-length mixed vectors, finetune.mark_close), or None when it
  is 0 or absent. `vectors` is the array or the .npy file holding it, read only when marks
  are on."""
  threshold = float(finetune.get("mark_close", 0.0) or 0.0)
  if threshold <= 0:
    return None
  vectors = np.asarray(vectors if isinstance(vectors, np.ndarray) else np.load(vectors),
                       np.float64)
  return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12), threshold


def close_marks(close, history_items, targets):
  """[N, K] bool: which listed items (-1: none) have a cosine to their row's target above the
  threshold of `close` = (unit vectors, threshold)."""
  unit, threshold = close
  items = np.asarray(history_items, np.int64)
  cosine = np.einsum("nkd,nd->nk", unit[np.maximum(items, 0)], unit[np.asarray(targets)])
  return (items >= 0) & (cosine > threshold)


def titled(item, genres=False):
  """An item's title as prompts name it; with `genres`, followed by its genres:
  "Toy Story (1995) (Animation, Children's, Comedy)"."""
  if genres and item.get("genres"):
    return f"{item['title']} ({', '.join(item['genres'])})"
  return item["title"]


def render_prompt(user, history, target, dataset_name, threshold=None, lifetime=None):
  """The question text of one sample; `history` is (title, rating) pairs in prompt order. With a
  like `threshold` (stars), the list is followed by the user's like count and mean rating over
  it (`templates.history_summary`); with `lifetime` = (count, liked, mean) of every earlier
  rating, by those too (`templates.lifetime_summary`)."""
  kind = templates.kind_of(dataset_name)
  lines = [templates.item_line(title, rating) for title, rating in history]
  parts = [None if threshold is None else
           templates.history_summary(kind, user, [r for _, r in history], threshold),
           None if lifetime is None else templates.lifetime_summary(kind, user, *lifetime)]
  summary = "\n".join(p for p in parts if p) or None
  return templates.prompt(kind, user, lines, target, summary)


def encode(tokenizer, user_text, answer=None):
  """input_ids and loss_mask (int32 arrays) of `user_text` in the chat template, plus `answer`.

  With a chat template the text already holds its special tokens, so none are added; without
  one the tokenizer adds its own. The answer's tokens are found as what tokenizing the prompt
  with the answer adds to the prompt alone, so a tokenizer that merges across the boundary
  fails loudly instead of masking the wrong tokens.
  """
  text = chat_prompt(tokenizer, user_text)
  special = not getattr(tokenizer, "chat_template", None)
  prompt_ids = tokenizer(text, add_special_tokens=special).input_ids
  ids = prompt_ids
  if answer is not None:
    ids = tokenizer(text + answer, add_special_tokens=special).input_ids
    if ids[:len(prompt_ids)] != prompt_ids or len(ids) == len(prompt_ids):
      raise ValueError(f"cannot isolate the tokens of the answer {answer!r} after the prompt")
  mask = np.zeros(len(ids), np.int32)
  mask[len(prompt_ids):] = 1
  return {"input_ids": np.asarray(ids, np.int32), "loss_mask": mask}


def _kept(history, n, drop):
  """The n history items left after dropping from the `drop` end ("first" or "last")."""
  return history[:n] if drop == "last" else history[len(history) - n:]


def encode_fitted(tokenizer, user, history, target, dataset_name, *, answer=None,
                  max_length=None, drop="last", threshold=None, lifetime=None):
  """`encode` of the sample's prompt with as many history items as fit in `max_length` tokens.

  The count is found by binary search (prompt length grows with the item count), so a K-item
  history costs about log2(K) tokenizations. Adds "kept", the number of items left.
  """
  if drop not in ("first", "last"):
    raise ValueError(f"drop must be 'first' or 'last', got {drop!r}")
  history = list(history)

  def attempt(n):
    text = render_prompt(user, _kept(history, n, drop), target, dataset_name, threshold,
                         lifetime)
    return dict(encode(tokenizer, text, answer), kept=n)

  def fits(enc):
    return max_length is None or len(enc["input_ids"]) <= max_length

  best = attempt(len(history))
  if fits(best):
    return best
  best = attempt(0)
  if not fits(best):
    raise ValueError(f"the prompt takes {len(best['input_ids'])} tokens with no history items, "
                     f"more than max_length={max_length}")
  lo, hi = 0, len(history)
  while hi - lo > 1:
    enc = attempt((lo + hi) // 2)
    if fits(enc):
      lo, best = enc["kept"], enc
    else:
      hi = enc["kept"]
  return best


def history_ratings(dataset, split, result):
  """Ratings [N, K] of the retrieved history items (NaN where the history is -1 padded).

  Each item's rating is the user's latest rating of it before the sample. Timeline rows are
  keyed by (user, item, row) in one sorted int64 code, so every lookup is one searchsorted.
  """
  t = dataset.timelines
  scale = len(t.item) + 1
  if dataset.num_users * dataset.num_items * scale >= 2 ** 62:
    raise ValueError("dataset too large for int64 (user, item, row) codes")
  row_user = np.repeat(np.arange(dataset.num_users, dtype=np.int64), np.diff(t.offsets))
  code = (row_user * dataset.num_items + t.item) * scale + np.arange(len(t.item))
  order = np.argsort(code)
  user = np.asarray(result["user"], np.int64)[:, None]
  hist = np.asarray(result["history"], np.int64)
  end = t.offsets[user] + dataset.splits[split].pos[np.asarray(result["sample"])][:, None]
  query = (user * dataset.num_items + hist) * scale + end
  at = np.searchsorted(code[order], query) - 1
  row = order[np.maximum(at, 0)]
  valid = hist >= 0
  found = (at >= 0) & (code[row] // scale == query // scale)
  if (valid & ~found).any():
    raise ValueError("a retrieved item is not in its sample's history")
  return np.where(valid, t.rating[row], np.nan)


def build_examples(dataset, result, tokenizer, *, split, labels=True, max_length=1024,
                   order="rerank", item_stats=False, user_stats=False,
                   user_lifetime_stats=False, genres=False, item_popularity=False, close=None):
  """Token ids and loss masks of every sample of a `retrieve` result, in its row order.

  labels=True appends each sample's answer (training); False leaves the prompt open for
  scoring. `order` is the retrieval order that made `result`; it picks the items dropped first
  when a prompt is too long. `item_stats` names the target with its earlier raters' like-rate,
  `item_popularity` with its popularity level (`rallrec_jax.prompts.item_stats`); `user_stats`
  follows the history with the user's like count and mean rating over the items kept
  (`templates.history_summary`); `user_lifetime_stats` adds the like-rate and mean rating over
  every earlier rating (`user_lifetime`); `genres` names every item with its genres (`titled`);
  `close` (`close_option`) follows the title of each listed item close to the target with MARK.
  Returns input_ids and loss_mask (lists of int32 arrays), label (int8 [N]), sample (index in the
  split [N]) and kept (history items in each prompt [N]).
  """
  if order not in DROP:
    raise ValueError(f"unknown retrieval order {order!r}; known: {sorted(DROP)}")
  name = dataset.meta["name"]
  samples = dataset.splits[split]
  sample = np.asarray(result["sample"], np.int64)
  label = samples.label[sample].astype(np.int8)
  ratings = history_ratings(dataset, split, result)
  phrases = (item_stats_lib.target_phrases(dataset, split, sample, item_stats, item_popularity)
             if item_stats or item_popularity else None)
  threshold = float(dataset.meta["label_threshold"]) if user_stats else None
  lifetime = (user_lifetime.counts(dataset, split, sample, float(dataset.meta["label_threshold"]))
              if user_lifetime_stats else None)
  marks = (close_marks(close, result["history"], result["target"]) if close is not None
           else np.zeros(np.shape(result["history"]), bool))
  out = {"input_ids": [], "loss_mask": [], "kept": []}
  for i, (user, target, hist) in enumerate(zip(result["user"], result["target"],
                                               result["history"])):
    pairs = [(titled(dataset.items[item], genres) + (MARK if marked else ""), rating)
             for item, rating, marked in zip(hist, ratings[i], marks[i]) if item >= 0]
    title = titled(dataset.items[target], genres)
    if phrases:
      title = f"{title} ({phrases[i]})"
    enc = encode_fitted(tokenizer, dataset.users[user], pairs, title, name,
                        answer=templates.ANSWERS[bool(label[i])] if labels else None,
                        max_length=max_length, drop=DROP[order], threshold=threshold,
                        lifetime=None if lifetime is None else [a[i] for a in lifetime])
    for key in out:
      out[key].append(enc[key])
  return dict(out, kept=np.asarray(out["kept"], np.int32), label=label, sample=sample)
