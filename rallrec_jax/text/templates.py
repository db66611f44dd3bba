"""Per-dataset text about items: description prompts (PAPER.md step 1) and the plain template.

Items are the dicts of `data/items.jsonl`; movie datasets have "title" and "genres", books
"title", "author", "year", "publisher", Amazon "title" and "categories".
"""

KINDS = {"synthetic": "movie", "ml100k": "movie", "ml1m": "movie", "bookcrossing": "book",
         "amazon_movies": "amazon"}

_MOVIE = ("Write a concise and informative description of the film {title}, whose genre is "
          "{genre}. Cover a brief plot overview without major spoilers, the main themes and "
          "genre, the setting or historical context, key characters and actors, the director and "
          "stylistic elements, the tone and mood, and its cultural impact. Keep it under 80 words "
          "and return only the description.")
_BOOK = ("Write a concise and informative description of the book {title} by {author}, published "
         "in {year} by {publisher}. Cover a brief plot or content overview without major "
         "spoilers, the main themes and genre, the setting or historical context, key characters, "
         "the author's style, the tone and mood, its cultural impact and basic publication "
         "details. Keep it under 80 words and return only the description.")
_AMAZON = ("Write a concise and informative description of the movie or TV product {title}, "
           "listed under {genre}. Cover a brief plot overview without major spoilers, the main "
           "themes and genre, the setting, key characters and actors, the director and stylistic "
           "elements, the tone and mood, and its cultural impact. Keep it under 80 words and "
           "return only the description.")


def _genre(item):
  names = item.get("genres") or item.get("categories") or []
  return ", ".join(names) if names else "unknown"


def _book_fields(item):
  return {k: item.get(k) or "unknown" for k in ("title", "author", "year", "publisher")}


def description_prompt(item, dataset):
  """The instruction asking the LLM to describe `item`."""
  kind = KINDS[dataset]
  if kind == "book":
    return _BOOK.format(**_book_fields(item))
  template = _MOVIE if kind == "movie" else _AMAZON
  return template.format(title=item.get("title", "unknown"), genre=_genre(item))


def plain_text(item, dataset):
  """The fixed template embedded instead of a description (ReLLa's plain variant)."""
  kind = KINDS[dataset]
  if kind == "book":
    f = _book_fields(item)
    return (f"Here is a book. Its title is {f['title']}. Its author is {f['author']}. It was "
            f"published in {f['year']} by {f['publisher']}.")
  what = "movie" if kind == "movie" else "product"
  return (f"Here is a {what}. Its title is {item.get('title', 'unknown')}. The {what}'s genre is "
          f"{_genre(item)}.")
