"""A seeded synthetic dataset with structure that retrieval and a rating model can find.

The structure is planted so that each claim of the paper has something real to measure:
  taste clusters  every item belongs to one cluster (its genre); every user has a home cluster
                  and, when `drift` > 0, a second one their taste moves towards over their own
                  time span, so recent history predicts a rating better than old history;
  item text       titles are built from the words of the item's cluster, and the cluster's
                  genre is the item's first genre, so text-based retrieval can see the clusters;
  ratings         whole stars 1..5 from the user's current preference for the item's cluster,
                  item quality, user bias and noise, in MovieLens 1M's shares (57% above 3).
Everything is vectorised over ratings, so a MovieLens-1M-sized set takes a few seconds.
`write_ml1m` writes the result as MovieLens 1M files, to test the real parsers on known data.
"""
import dataclasses
import itertools
from pathlib import Path

import numpy as np

from rallrec_jax.data.movielens import ML1M_OCCUPATIONS
from rallrec_jax.data.raw import RawData

START = 946684800                  # 2000-01-01 00:00:00 UTC, where user activity starts
DAY = 86400
MIN_RATINGS = 20                   # MovieLens 1M keeps users with at least 20 ratings
STAR_SHARES = (0.056, 0.108, 0.261, 0.349, 0.226)   # MovieLens 1M's shares of 1..5 stars
PREFERENCE_WEIGHT = 2.0            # rating gain of a fully preferred cluster
CHOICE_WEIGHT = 1.5                # how strongly users pick items of clusters they like
TASTE_SD = 0.3                     # per-user liking of each cluster beyond home and second
QUALITY_SD = 0.5
BIAS_SD = 0.35
NOISE_SD = 0.7
SECOND_GENRE_RATE = 0.3            # items that list a second, unrelated genre
CHUNK = 1 << 21                    # user-item scores drawn at once when choosing items
GENRE_SEPARATORS = ("::", "\n", "|")

# Genre name, title adjectives and title nouns of each base cluster.
GENRES = (
    ("Space Opera", ("Crimson", "Stellar", "Distant", "Galactic", "Orbital", "Starborn"),
     ("Voyage", "Nebula", "Starship", "Frontier", "Empire", "Comet")),
    ("Courtroom Drama", ("Sworn", "Reasonable", "Hidden", "Twelfth", "Guilty", "Sealed"),
     ("Verdict", "Witness", "Testimony", "Jury", "Appeal", "Docket")),
    ("Romantic Comedy", ("Sweet", "Accidental", "Runaway", "Lucky", "Second", "Sunny"),
     ("Wedding", "Kiss", "Date", "Proposal", "Valentine", "Honeymoon")),
    ("Western", ("Dusty", "Lone", "Outlaw", "High", "Wild", "Rusty"),
     ("Saddle", "Canyon", "Ranch", "Rider", "Sheriff", "Stagecoach")),
    ("Film Noir", ("Shadowed", "Rainy", "Crooked", "Midnight", "Smoky", "Double"),
     ("Alibi", "Dame", "Detective", "Alley", "Confession", "Racket")),
    ("Horror", ("Haunted", "Hollow", "Bleeding", "Cursed", "Pale", "Howling"),
     ("Crypt", "Asylum", "Coven", "Attic", "Ritual", "Harvest")),
    ("Heist Thriller", ("Perfect", "Inside", "Golden", "Clean", "Quiet", "Fast"),
     ("Job", "Vault", "Getaway", "Score", "Diamond", "Casino")),
    ("Animated Fable", ("Little", "Brave", "Magic", "Tiny", "Friendly", "Enchanted"),
     ("Fox", "Kingdom", "Lantern", "Dragon", "Forest", "Balloon")),
    ("War Epic", ("Burning", "Fallen", "Last", "Steel", "Bloody", "Northern"),
     ("Battalion", "Trench", "Beachhead", "Siege", "Armistice", "Frontline")),
    ("Musical", ("Singing", "Dancing", "Broadway", "Jazzy", "Starlit", "Swinging"),
     ("Melody", "Chorus", "Ballroom", "Serenade", "Rhapsody", "Encore")),
    ("Documentary", ("Secret", "Untold", "Living", "Vanishing", "Deep", "Modern"),
     ("Planet", "Ocean", "Machine", "Reef", "Chronicle", "River")),
    ("Martial Arts", ("Drunken", "Jade", "Shaolin", "Furious", "Crouching", "Seventh"),
     ("Fist", "Temple", "Master", "Tiger", "Blade", "Lotus")),
)
# (adjective genre, noun genre) of each cluster: the base genres, then every ordered pair.
CLUSTER_KINDS = ([(a, a) for a in range(len(GENRES))]
                 + list(itertools.permutations(range(len(GENRES)), 2)))
TITLE_TEMPLATES = ("The {a} {n}", "{a} {n}", "{n} of the {m}", "The {n} and the {m}")
GENDERS = ("M", "F")
GENDER_SHARES = (0.72, 0.28)
AGES = (1, 18, 25, 35, 45, 50, 56)   # MovieLens 1M age codes and their shares
AGE_SHARES = (0.037, 0.183, 0.347, 0.198, 0.091, 0.082, 0.062)
OCCUPATIONS = ML1M_OCCUPATIONS   # the index is the code in users.dat


@dataclasses.dataclass
class Truth:
  """The hidden structure behind a generated set, so tests can check it is measurable.

  Index i of an item array is raw item id i + 1; index u of a user array is raw user id u + 1.
  """
  item_cluster: np.ndarray   # int64 [num_items]
  home: np.ndarray           # int64 [num_users] cluster a user starts out preferring
  second: np.ndarray         # int64 [num_users] cluster their taste drifts towards
  names: list                # genre name of each cluster


def load(cfg):
  """The synthetic set named by the `data` config block."""
  s = cfg.synthetic
  return generate(s.num_users, s.num_items, s.num_ratings, s.num_clusters, s.drift, s.seed)


def input_files(cfg):
  """No files: the config alone decides the data."""
  return []


def generate(num_users, num_items, num_ratings, num_clusters, drift, seed):
  """A deterministic `RawData` with planted taste clusters, item text and taste drift."""
  return generate_with_truth(num_users, num_items, num_ratings, num_clusters, drift, seed)[0]


def generate_with_truth(num_users, num_items, num_ratings, num_clusters, drift, seed):
  """`generate`, plus the `Truth` it planted."""
  _check_sizes(num_users, num_items, num_ratings, num_clusters, drift)
  rng = np.random.default_rng(seed)
  item_cluster = rng.integers(0, num_clusters, num_items)
  home = rng.integers(0, num_clusters, num_users)
  second = (home + rng.integers(1, max(num_clusters, 2), num_users)) % num_clusters
  taste = rng.normal(0.0, TASTE_SD, (num_users, num_clusters))
  quality = rng.normal(0.0, QUALITY_SD, num_items)
  popularity = rng.normal(0.0, 1.0, num_items) + quality / QUALITY_SD
  bias = rng.normal(0.0, BIAS_SD, num_users)
  counts = _ratings_per_user(rng, num_users, num_items, num_ratings)
  # What a user picks follows their liking at the middle of their span (the average preference).
  liking = taste + _preference(home[:, None], second[:, None], np.arange(num_clusters), drift, 0.5)
  user, item = _choose_items(rng, counts, popularity, CHOICE_WEIGHT * liking, item_cluster)
  pos, item = _order_timelines(rng, user, item, counts, item_cluster[item] == home[user],
                               item_cluster[item] == second[user], drift)
  frac, timestamp = _times(rng, user, pos, counts)
  cluster = item_cluster[item]
  score = (PREFERENCE_WEIGHT * _preference(home[user], second[user], cluster, drift, frac)
           + taste[user, cluster] + quality[item] + bias[user]
           + rng.normal(0.0, NOISE_SD, len(user)))
  names = cluster_names(num_clusters)
  raw = RawData(user=user + 1, item=item + 1, rating=_stars(score), timestamp=timestamp,
                items=_items(rng, item_cluster, names), users=_users(rng, num_users))
  return raw, Truth(item_cluster=item_cluster, home=home, second=second, names=names)


def _check_sizes(num_users, num_items, num_ratings, num_clusters, drift):
  """Refuse sizes that cannot be generated, naming the broken limit."""
  sizes = dict(num_users=num_users, num_items=num_items, num_ratings=num_ratings,
               num_clusters=num_clusters)
  for name, value in sizes.items():
    if not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"synthetic {name} must be a positive integer, got {value!r}")
  if num_ratings > num_users * num_items:
    raise ValueError(f"synthetic num_ratings={num_ratings} exceeds num_users * num_items = "
                     f"{num_users * num_items}: a user rates each item at most once")
  if not 0.0 <= drift <= 1.0:
    raise ValueError(f"synthetic drift must lie in [0, 1], got {drift!r}")


def _preference(home, second, cluster, drift, t):
  """Preference for `cluster` at relative time t: home fades, second grows, by `drift`."""
  return (1.0 - drift * t) * (cluster == home) + drift * t * (cluster == second)


def _ratings_per_user(rng, num_users, num_items, num_ratings):
  """A skewed count per user with a MovieLens-like floor, capped at num_items, summing exactly."""
  floor = min(MIN_RATINGS, num_ratings // num_users, num_items)
  weights = rng.lognormal(0.0, 1.0, num_users)
  extra = rng.multinomial(num_ratings - floor * num_users, weights / weights.sum())
  counts = np.minimum(floor + extra, num_items)
  # Ratings cut by the cap go to users with room left, in a random order of users.
  order = rng.permutation(num_users)
  room = num_items - counts[order]
  short = num_ratings - counts.sum()
  counts[order] += np.clip(short - (np.cumsum(room) - room), 0, room)
  return counts


def _choose_items(rng, counts, popularity, liking, item_cluster):
  """Each user's items, drawn without replacement with probability ~ exp(popularity + liking).

  Gumbel top-k: the items with the largest `logit + Gumbel noise` of a user are a weighted
  sample without replacement. Users are drawn in chunks to bound memory.
  """
  num_users, num_items = len(counts), len(popularity)
  rows = max(1, CHUNK // num_items)
  rank = np.arange(num_items)
  items = []
  for lo in range(0, num_users, rows):
    logits = popularity + liking[lo:lo + rows][:, item_cluster]
    keys = logits - np.log(rng.standard_exponential(logits.shape))
    order = np.argsort(-keys, axis=1)
    items.append(order[rank < counts[lo:lo + rows, None]])
  user = np.repeat(np.arange(num_users), counts)
  return user, np.concatenate(items)


def _order_timelines(rng, user, item, counts, is_home, is_second, drift):
  """Order each user's items in time; home-cluster items lean early, second-cluster ones late.

  Returns each row's position in its user's timeline and the items in timeline order (rows
  stay grouped by user).
  """
  r = rng.random(len(user))
  lean = 1.0 / (1.0 + 2.0 * drift)
  key = np.where(is_second, r ** lean, np.where(is_home, 1.0 - (1.0 - r) ** lean, r))
  order = np.lexsort((key, user))
  pos = np.arange(len(user)) - np.repeat(np.cumsum(counts) - counts, counts)
  return pos, item[order]


def _times(rng, user, pos, counts):
  """Bursty, strictly increasing timestamps per user over overlapping activity periods.

  Returns each row's relative time in [0, 1] within its user's span, and the timestamps.
  """
  num_users = len(counts)
  first = np.cumsum(counts) - counts
  elapsed = np.cumsum(rng.lognormal(0.0, 2.0, len(user)))
  elapsed -= np.repeat(elapsed[first], counts)
  total = elapsed[first + counts - 1]
  frac = elapsed / np.maximum(total, 1e-9)[user]
  start = START + rng.integers(0, 2 * 365 * DAY, num_users)
  span = np.clip(rng.lognormal(np.log(90 * DAY), 1.2, num_users), DAY, 3 * 365 * DAY)
  timestamp = start[user] + np.floor(frac * span[user]).astype(np.int64) + pos
  return frac, timestamp


def _stars(score):
  """Whole stars 1..5 cut at the quantiles that give MovieLens 1M's share of each star."""
  cuts = np.quantile(score, np.cumsum(STAR_SHARES)[:-1])
  return (1 + np.searchsorted(cuts, score)).astype(np.float32)


def cluster_names(num_clusters):
  """A distinct genre name per cluster: the base genres, then pairs of them, then numbered."""
  return [_vocabulary(c)[0] for c in range(num_clusters)]


def _vocabulary(cluster):
  """(genre name, adjectives, nouns) of a cluster; clusters past the base list mix two genres."""
  a, b = CLUSTER_KINDS[cluster % len(CLUSTER_KINDS)]
  name = GENRES[a][0] if a == b else f"{GENRES[a][0]} & {GENRES[b][0]}"
  if cluster >= len(CLUSTER_KINDS):
    name = f"{name} {cluster // len(CLUSTER_KINDS) + 1}"
  return name, GENRES[a][1], GENRES[b][2]


def _items(rng, item_cluster, names):
  """Title and genres of each item, from its cluster's words; repeated titles get a number."""
  vocab = [_vocabulary(c) for c in range(len(names))]
  years = np.clip(2000 - np.floor(rng.exponential(12.0, len(item_cluster))), 1919, 2000)
  seen = {}
  items = {}
  for i, c in enumerate(item_cluster.tolist()):
    _, adjectives, nouns = vocab[c]
    template = TITLE_TEMPLATES[rng.integers(len(TITLE_TEMPLATES))]
    n, m = rng.choice(len(nouns), 2, replace=False)
    title = template.format(a=adjectives[rng.integers(len(adjectives))], n=nouns[n], m=nouns[m])
    seen[title] = seen.get(title, 0) + 1
    if seen[title] > 1:
      title = f"{title} {seen[title]}"
    genres = [names[c]]
    if len(names) > 1 and rng.random() < SECOND_GENRE_RATE:
      genres.append(names[(c + rng.integers(1, len(names))) % len(names)])
    items[i + 1] = {"title": f"{title} ({int(years[i])})", "genres": genres}
  return items


def _users(rng, num_users):
  """MovieLens 1M-like profiles: gender, age code and occupation name."""
  gender = rng.choice(len(GENDERS), num_users, p=GENDER_SHARES)
  age = rng.choice(len(AGES), num_users, p=np.array(AGE_SHARES) / sum(AGE_SHARES))
  occupation = rng.integers(0, len(OCCUPATIONS), num_users)
  return {u + 1: {"gender": GENDERS[g], "age": AGES[a], "occupation": OCCUPATIONS[o]}
          for u, (g, a, o) in enumerate(zip(gender.tolist(), age.tolist(), occupation.tolist()))}


def write_ml1m(raw, folder):
  """Write `raw` as MovieLens 1M's ratings.dat, movies.dat and users.dat in `folder`.

  The files follow the GroupLens format byte for byte (`::` separated, latin-1, `\\n` line
  ends), so the MovieLens parser can be tested on data whose content is known. Ratings are
  written in time order; an occupation outside ML-1M's list is written as 0 ("other"), as
  ML-1M does; the zip code is derived from the user id.
  """
  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  _write(folder / "ratings.dat", _ratings_lines(raw))
  _write(folder / "movies.dat", [_movie_line(i, v) for i, v in sorted(raw.items.items())])
  codes = {name: code for code, name in enumerate(OCCUPATIONS)}
  users = [f"{u}::{p['gender']}::{p['age']}::{codes.get(p['occupation'], 0)}::"
           f"{u * 7919 % 100000:05d}" for u, p in sorted(raw.users.items())]
  _write(folder / "users.dat", users)


def _ratings_lines(raw):
  """`UserID::MovieID::Rating::Timestamp` per rating in time order, built with numpy strings."""
  stars = raw.rating.astype(np.float64)
  if not np.array_equal(stars, np.round(stars)):
    raise ValueError("MovieLens 1M ratings are whole stars; found a fractional rating")
  order = np.lexsort((raw.item, raw.user, raw.timestamp))
  columns = (raw.user, raw.item, stars.astype(np.int64), raw.timestamp)
  text = np.dtypes.StringDType()
  line = columns[0][order].astype(np.int64).astype(text)
  for column in columns[1:]:
    line = np.strings.add(np.strings.add(line, "::"), column[order].astype(np.int64).astype(text))
  return line.tolist()


def _movie_line(item_id, fields):
  genres = "|".join(_field(g, item_id, GENRE_SEPARATORS) for g in fields["genres"])
  return f"{item_id}::{_field(fields['title'], item_id)}::{genres}"


def _field(text, item_id, separators=("::", "\n")):
  """A title or genre that cannot break the `::` separated (and `|` joined) format."""
  if any(sep in text for sep in separators):
    raise ValueError(f"item {item_id}: {text!r} contains one of {separators}, which would "
                     f"break the MovieLens format")
  return text


def _write(path, lines):
  path.write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
