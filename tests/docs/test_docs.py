"""The documentation is true to the code: the generated CLI page is current, links resolve, the README is short."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from visualglm.cli import reference

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_cli_page_is_generated_from_the_current_parser() -> None:
    _, current = reference.page_parts(reference.PAGE.read_text(encoding="utf-8"))
    assert current == reference.generated(), "docs/cli.md is out of date: python -m visualglm.cli.reference --write"


def test_cli_page_lists_every_subcommand_and_option() -> None:
    from visualglm.cli.main import build_parser

    page = reference.PAGE.read_text(encoding="utf-8")
    for name, sub, _ in reference._subcommands(build_parser()):
        assert f"`{sub.prog}`" in page, name
        for action in sub._actions:
            if action.help == argparse.SUPPRESS:  # a hidden earlier spelling (e.g. --quant for --quantize)
                continue
            for flag in action.option_strings:
                if flag not in ("-h", "--help"):
                    assert f"`{flag}`" in page, f"{sub.prog} {flag}"


def test_cli_check_mode_reports_a_stale_page(tmp_path, monkeypatch, capsys) -> None:
    stale = tmp_path / "cli.md"
    stale.write_text(f"intro\n{reference.MARKER}\n## `visualglm gone`\n", encoding="utf-8")
    monkeypatch.setattr(reference, "PAGE", stale)
    assert reference.main(["--check"]) == 1
    assert "out of date" in capsys.readouterr().err
    assert reference.main(["--write"]) == 0
    assert reference.main(["--check"]) == 0
    assert stale.read_text(encoding="utf-8").startswith("intro\n")


def test_readme_stays_short_and_links_into_docs() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 200
    for command in ("make demo", "make test"):
        assert command in readme


def test_relative_links_resolve() -> None:
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, broken


def test_no_page_reads_as_a_changelog() -> None:
    """History belongs in CHANGELOG.md; the docs describe the software as it is."""
    pattern = re.compile(r"\bused to\b|\bBefore the\b|\bno longer\b|\bEarlier figures\b")
    offenders = [f"{page.relative_to(ROOT)}: {line.strip()[:80]}" for page in PAGES if page.name != "CHANGELOG.md"
                 for line in page.read_text(encoding="utf-8").splitlines() if pattern.search(line)]
    assert not offenders, offenders
