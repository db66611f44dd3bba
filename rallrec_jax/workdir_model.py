"""The workdir's LLM: the configured model folder, or the tiny random decoder built for its data."""
import hashlib
import json
from pathlib import Path

from rallrec_jax import atomic, config as config_lib, distributed, parallel
from rallrec_jax.llm import load_pretrained, tiny
from rallrec_jax.prompts import item_stats, render
from rallrec_jax.text import templates


MODEL_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json",
               "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def model_files(cfg):
  """The files of the configured model folder (none for the tiny model, built from config)."""
  if not cfg.model.path:
    return []
  folder = Path(cfg.model.path).expanduser()
  return sorted(p for p in folder.iterdir()
                if p.name in MODEL_FILES or p.name.endswith(".safetensors"))


def _tiny_folder(workdir):
  return Path(workdir) / "model_tiny"


def model_folder(cfg, workdir):
  """The folder the workdir's LLM loads from: model.path, else W/model_tiny."""
  return Path(cfg.model.path).expanduser() if cfg.model.path else _tiny_folder(workdir)


def _tiny_model_folder(cfg, workdir, dataset):
  """W/model_tiny: a random decoder whose vocabulary covers the items' text and prompts."""
  folder = _tiny_folder(workdir)
  texts = _tiny_vocabulary_texts(dataset, cfg.finetune.user_lifetime_stats,
                                 cfg.finetune.item_popularity)
  key = hashlib.sha256(json.dumps([cfg.model.tiny.to_dict(), dataset.meta, texts],
                                  sort_keys=True).encode()).hexdigest()
  if (folder / "config.json").is_file() and (folder / "key").is_file() and (
      (folder / "key").read_text() == key):
    return folder
  with atomic.directory(folder) as tmp:
    t = cfg.model.tiny
    tiny.build(tmp, texts, hidden_size=t.hidden_size, num_layers=t.num_layers,
               num_heads=t.num_heads, num_kv_heads=t.num_kv_heads,
               intermediate_size=t.intermediate_size, seed=t.seed, init_std=t.init_std,
               number_line=tuple(t.number_line))
    (tmp / "key").write_text(key)
  return folder


def _tiny_vocabulary_texts(dataset, lifetime=False, popularity=False):
  """Texts whose words the tiny tokenizer must know: the items, the description prompts, the
  plain template, and the recommendation question with every rating from 0 to 10 stars and
  every user's profile, the history summary (`finetune.user_stats`) and the target's like-rate
  phrase (`finetune.item_stats`), so that no word of a prompt (the target's *** marks, "stars",
  an occupation) or of an embedded text reads as <unk>. `lifetime` adds the lifetime summary
  (`finetune.user_lifetime_stats`); without it the texts, and so the random weights, are those
  of every earlier run."""
  name = dataset.meta["name"]
  texts = [json.dumps(it, ensure_ascii=False) for it in dataset.items]
  texts += [templates.description_prompt(it, name) for it in dataset.items[:50]]
  texts += [templates.plain_text(it, name) for it in dataset.items[:50]]
  titles = [it["title"] for it in dataset.items[:11]]
  history = [(titles[r % len(titles)], r) for r in range(11)]
  texts.append(render.render_prompt(dataset.users[0], history, titles[0], name,
                                    threshold=dataset.meta["label_threshold"]))
  texts += [render.render_prompt(user, [], titles[0], name) for user in dataset.users]
  texts.append(item_stats.vocabulary_text())
  if lifetime:
    texts.append(render.render_prompt(dataset.users[0], history, titles[0], name,
                                      lifetime=(87, 45, 3.6)))
  phrase = item_stats.phrase(None, 0)
  if popularity and set(tiny.vocabulary([phrase])) - set(tiny.vocabulary(texts)):
    texts.append(phrase)
  return texts


def load_model(cfg, workdir, dataset):
  """The configured LLM on the configured mesh."""
  m = cfg.model
  if m.path:
    path = m.path
  elif distributed.is_primary():
    path = _tiny_model_folder(cfg, workdir, dataset)
  else:
    path = _tiny_folder(workdir)
    distributed.wait_for((path / "key").is_file, f"process 0 to build {path}")
  mesh = parallel.make_mesh(tuple(tuple(x) for x in m.mesh))
  return load_pretrained(path, dtype=m.dtype, param_dtype=m.param_dtype or None, mesh=mesh,
                         rules=config_lib.model_rules(m), remat=m.remat, attention=m.attention,
                         scan_layers=m.scan_layers)
