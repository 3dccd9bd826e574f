"""The README's layout section names every module of the packages (a new module gets its line there)."""

from __future__ import annotations

from tests.helpers import REPO

PACKAGES = ("datamodules", "irlab", "irgen", "areir", "callbacks")


def test_every_module_is_in_the_readme_layout():
    layout = (REPO / "README.md").read_text().split("## Layout", 1)[1]
    modules = [f for package in PACKAGES for f in (REPO / package).rglob("*.py") if f.name != "__init__.py"]
    missing = sorted(str(f.relative_to(REPO)) for f in modules if f.name not in layout)
    assert missing == []
