"""The Yes/No question of each dataset kind (PAPER.md step 8), word for word.

History items are listed one per line, without numbers, as the paper's "{list}" shows them.
Kinds follow `rallrec_jax.text.templates.KINDS`: "movie" (synthetic, ML-100K, ML-1M), "book"
(BookCrossing), "amazon" (Amazon Movies & TV).
"""
from rallrec_jax.text.templates import KINDS

ANSWERS = {True: "Yes.", False: "No."}

_GENDERS = {"M": ("male", "He", "His"), "F": ("female", "She", "Her")}
_WORDS = {  # kind -> (things, verb, threshold in stars)
    "movie": ("movies", "watched", 3),
    "amazon": ("movies", "watched", 3),
    "book": ("books", "read", 4),
}
_HEAD = "{subject} {verb} the following relevant {things} in the past, and rated them:"
_SUMMARY = "{subject} liked {liked} of these {count} {things}, rated {mean:.1f} stars on average."
_LIFETIME = ("Of all {count} {things} {pronoun} rated before, {pronoun} liked {percent}% of them, "
             "{mean:.1f} stars on average.")
_TAIL = (
    "Note that more stars the user rated the {thing}, the user liked the {thing} more.\n"
    "And we think the user will like a new {thing} if the rating could be higher than "
    "{threshold} stars\n"
    "Based on the {things} {pronoun} has {verb}, deduce if {pronoun} will like the {thing} "
    "***{target}***.\n"
    "You should ONLY tell me yes or no.")


def kind_of(dataset_name):
  """The prompt kind of a dataset name; unknown names fail here rather than in a template."""
  if dataset_name not in KINDS:
    raise ValueError(f"no prompt template for dataset {dataset_name!r}; known: {sorted(KINDS)}")
  return KINDS[dataset_name]


def stars(rating):
  """'4 stars', '3.5 stars', '1 star': whole ratings as integers, 'star' for ratings <= 1."""
  value = float(rating)
  number = str(int(value)) if value.is_integer() else f"{value:g}"
  return f"{number} star" if value <= 1 else f"{number} stars"


def item_line(title, rating):
  """One history item as the prompt lists it."""
  return f"{title} ({stars(rating)})"


def _movie_profile(user):
  """'The user is a male. His job is ... His age is ...', with ML-1M's age group when known."""
  if user.get("gender") not in _GENDERS:
    raise ValueError(f"user gender must be 'M' or 'F', got {user.get('gender')!r}")
  gender, _, his = _GENDERS[user["gender"]]
  age = user.get("age_group", user.get("age"))
  return f"The user is a {gender}. {his} job is {user['occupation']}. {his} age is {age}.\n"


def _book_profile(user):
  """'The user's location is ... The user's age is ...', 'unknown' for missing fields."""
  country = user.get("country") or "unknown"
  age = user.get("age")
  return f"The user's location is {country}. The user's age is {age if age else 'unknown'}.\n"


def _subject(kind, user):
  """(sentence subject, pronoun after 'if') of the question: 'He'/'he' or 'The user'/'the user'."""
  if kind == "movie":
    he = _GENDERS[user["gender"]][1]
    return he, he.lower()
  return "The user", "the user"


def history_summary(kind, user, ratings, threshold):
  """'He liked 3 of these 5 movies, rated 3.8 stars on average.' (the user's like-rate and mean
  rating over the listed items, as the baselines count them: liked means above `threshold`);
  None for an empty history."""
  ratings = [float(r) for r in ratings]
  if not ratings:
    return None
  liked = sum(r > threshold for r in ratings)
  return _SUMMARY.format(subject=_subject(kind, user)[0], liked=liked, count=len(ratings),
                         things=_WORDS[kind][0], mean=sum(ratings) / len(ratings))


def lifetime_summary(kind, user, count, liked, mean):
  """'Of all 87 movies he rated before, he liked 52% of them, 3.6 stars on average.' (the user's
  like-rate and mean rating over every earlier rating, `rallrec_jax.prompts.user_lifetime`);
  None for a user with no earlier rating."""
  if not count:
    return None
  return _LIFETIME.format(count=int(count), things=_WORDS[kind][0],
                          pronoun=_subject(kind, user)[1],
                          percent=int(round(100 * liked / count)), mean=float(mean))


def prompt(kind, user, lines, target, summary=None):
  """The question for one sample: `lines` are history item lines in prompt order; `summary`, a
  line after them (`history_summary`, an extension of the paper's prompt) or None."""
  profile = {"movie": _movie_profile, "book": _book_profile}.get(kind, lambda _: "")(user)
  things, verb, threshold = _WORDS[kind]
  subject, pronoun = _subject(kind, user)
  words = dict(subject=subject, verb=verb, things=things, thing=things[:-1],
               threshold=threshold, pronoun=pronoun, target=target)
  body = [_HEAD.format(**words), *lines] + ([summary] if summary else [])
  return profile + "\n".join([*body, _TAIL.format(**words)])
