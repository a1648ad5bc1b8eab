"""The documentation stays true to the tree: every relative link and every file path named in
README.md, docs/ and the study READMEs exists, every run-config key is documented, and the
design page names every module."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted(
    [
        ROOT / "README.md",
        ROOT / "BENCHMARKS.md",
        *(ROOT / "docs").glob("*.md"),
        *(ROOT / "simulations" / "results").glob("*/README.md"),
    ]
)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# a path in backquotes that starts at a top-level folder of the repository
TOP = ("adc_flwr", "clients", "strategies", "simulations", "scripts", "benchmarks", "notebooks")
PATH = re.compile(r"`((?:" + "|".join(TOP) + r"|tests|docs|\.ci)/[^`\s]*)`")


def ids(pages: list[Path]) -> list[str]:
    return [str(p.relative_to(ROOT)) for p in pages]


@pytest.mark.parametrize("page", PAGES, ids=ids(PAGES))
def test_relative_links_lead_somewhere(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    missing = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # https:, mailto:, in-page anchors
        path = (page.parent / target.split("#")[0]).resolve()
        if not path.exists():
            missing.append(target)
    assert not missing, f"{page.name} links to what does not exist: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=ids(PAGES))
def test_file_paths_named_exist(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    missing = []
    for named in PATH.findall(text):
        if any(c in named for c in "<>*{"):
            continue  # a pattern (results/<run-name>/), not a path
        if not (ROOT / named.rstrip(".,:;)")).exists():
            missing.append(named)
    assert not missing, f"{page.name} names paths that do not exist: {missing}"


def test_every_run_config_key_is_documented() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    keys = pyproject["tool"]["flwr"]["app"]["config"]
    documented = set(
        re.findall(r"`([a-z0-9-]+)`", (ROOT / "docs" / "configuration.md").read_text())
    )
    assert sorted(set(keys) - documented) == []


def test_the_design_page_names_every_module() -> None:
    """Every package and module where code runs, but the one-per-method compressors and the
    data sources the page describes together."""
    design = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    unnamed = []
    for top in ("adc_flwr", "clients", "strategies", "simulations"):
        for module in sorted((ROOT / top).rglob("*.py")):
            relative = module.relative_to(ROOT)
            if module.name == "__init__.py":
                name = f"{module.parent.name}/"
            elif relative.parts[:2] in (("adc_flwr", "compression"), ("adc_flwr", "data")):
                continue
            else:
                name = module.name
            if name not in design:
                unnamed.append(str(relative))
    assert unnamed == []


def test_the_experiment_file_example_expands_as_documented(tmp_path: Path) -> None:
    from simulations.experiments import load_experiment

    page = (ROOT / "docs" / "sweeps.md").read_text(encoding="utf-8")
    example = re.search(r"```toml\n(.*?)```", page, re.S)
    assert example is not None
    (tmp_path / "example.toml").write_text(example[1])
    names = [p.name for p in load_experiment(tmp_path / "example.toml").points]
    assert names[:3] == ["none-s1", "none-s2", "none-s3"] and "adc-xb0.5-xt0.2" in names
    assert all(f"`{name}`" in page for name in ("adc-s1", "adc-xb0.5-xt0.2"))
