"""MovieLens through tensorflow-datasets (`data.source="tfds"`), an optional source.

Building MovieLens with tfds needs TensorFlow and the byte-exact GroupLens zip; TensorFlow also
breaks `import scann` when installed beside it. Our own parsers (`data.source="files"`) are
the default; this source exists for users who already keep tfds-prepared copies.
`data.path`, when set, is the tfds data_dir.
"""
import importlib.util

import numpy as np

from rallrec_jax.data import raw

TFDS_NAMES = {"ml100k": "movielens/100k-ratings", "ml1m": "movielens/1m-ratings"}
MISSING_TF = ("data.source='tfds' needs TensorFlow, which is not installed. Either "
              "`pip install tensorflow` (note: it breaks `import scann` in the same environment), "
              "or use our own parsers: --config.data.source=files --config.data.path=DIR "
              "with the GroupLens files")


def tensorflow_available():
  return importlib.util.find_spec("tensorflow") is not None


def _text(values):
  return np.array([v.decode("utf-8", "replace") for v in values])


def load(cfg):
  if not tensorflow_available():
    raise RuntimeError(MISSING_TF)
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  builder = tfds.builder(TFDS_NAMES[cfg.name], data_dir=cfg.path or None)
  builder.download_and_prepare()
  genre_names = builder.info.features["movie_genres"].feature.names
  rows = tfds.as_numpy(builder.as_dataset(split="train", batch_size=-1))
  user = _text(rows["user_id"]).astype(np.int64)
  item = _text(rows["movie_id"]).astype(np.int64)
  titles = _text(rows["movie_title"])
  genres = rows["movie_genres"]
  genres = genres.to_list() if hasattr(genres, "to_list") else list(genres)
  occupations = _text(rows["user_occupation_text"])
  ages = rows["bucketized_user_age"].astype(int)
  genders = rows["user_gender"]
  items, users = {}, {}
  for i in np.unique(item, return_index=True)[1]:
    items[int(item[i])] = {"title": titles[i], "genres": [genre_names[g] for g in genres[i]]}
  for i in np.unique(user, return_index=True)[1]:
    users[int(user[i])] = {"gender": "M" if genders[i] else "F", "age": int(ages[i]),
                           "occupation": occupations[i]}
  return raw.RawData(user=user, item=item, rating=rows["user_rating"].astype(np.float32),
                     timestamp=rows["timestamp"].astype(np.int64), items=items, users=users)


def input_files(cfg):
  del cfg
  return []
