"""Every relative link in the README and docs/ points at a file or directory of the repository."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
  missing = []
  for target in LINK.findall(page.read_text()):
    if re.match(r"[a-z]+:", target) or target.startswith("#"):
      continue  # external address or an anchor in the same page
    path = (page.parent / target.split("#", 1)[0]).resolve()
    if not path.exists():
      missing.append(target)
  assert not missing, f"{page.relative_to(ROOT)} links to missing files: {missing}"
