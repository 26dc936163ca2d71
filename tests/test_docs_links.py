"""Every relative link in the README and docs/ points at a file or directory of the repository, and every
anchor (`page.md#heading`, `#heading`) at a heading of the page it names."""

import functools
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6} +(.+?) *#*$", flags=re.M)
FENCE = re.compile(r"^```.*?^```", flags=re.M | re.S)


def slug(heading: str) -> str:
  """GitHub's anchor for a heading: lower case, markup and punctuation dropped, spaces to hyphens."""
  text = re.sub(r"\[([^]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
  text = re.sub(r"[^\w\- ]", "", text.lower().replace("`", ""))
  return text.replace(" ", "-")


@functools.cache
def anchors(page: pathlib.Path) -> frozenset[str]:
  """The page's heading anchors; a repeated heading gets -1, -2, ... as on GitHub. Code blocks hold no
  headings (a `# comment` in a shell block is not one)."""
  seen: dict[str, int] = {}
  out = set()
  for heading in HEADING.findall(FENCE.sub("", page.read_text())):
    base = slug(heading)
    count = seen.get(base, 0)
    seen[base] = count + 1
    out.add(base if count == 0 else f"{base}-{count}")
  return frozenset(out)


def test_slug_follows_githubs_rules():
  assert slug("Figures on an NVIDIA H100, 2026-11-26") == "figures-on-an-nvidia-h100-2026-11-26"
  assert slug("Searching only captions that keep their meaning (`--meaning-filter`)") == (
      "searching-only-captions-that-keep-their-meaning---meaning-filter")
  assert slug("The held-out-forms world") == "the-held-out-forms-world"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
  missing = []
  for target in LINK.findall(page.read_text()):
    if re.match(r"[a-z]+:", target):
      continue  # external address
    file, _, anchor = target.partition("#")
    path = (page.parent / file).resolve() if file else page
    if not path.exists():
      missing.append(target)
    elif anchor and path.suffix == ".md" and anchor not in anchors(path):
      missing.append(target)
  assert not missing, f"{page.relative_to(ROOT)} links to missing files or headings: {missing}"
