"""The project's text: a short README, links that resolve, documentation that matches the code, no history."""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import rtsort
from rtsort.config import Config

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_MAX_CHARS = 15000
FRESH_MACHINE = (
    "bash tools/install.sh && .venv/bin/rtsort demo        # main job: simulate, train, sort, evaluate (~25 s)",
    "bash tools/install.sh && bash tools/loopback.sh .venv/bin/python -m pytest   # the tests (.ci/run runs this line)",
)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _markdown_files() -> list[Path]:
    return [README] + sorted(DOCS.glob("*.md"))


def _prose(text: str) -> str:
    """Markdown without fenced code blocks and inline code, where brackets are not links."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    out = set()
    for line in _strip_fences(path.read_text()).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            out.add(re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-"))
    return out


def _strip_fences(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def test_readme_is_short():
    n = len(README.read_text(encoding="utf-8"))
    assert n <= README_MAX_CHARS, f"README.md has {n} characters, at most {README_MAX_CHARS}: move detail to docs/"


def test_readme_keeps_the_two_fresh_machine_commands():
    lines = README.read_text(encoding="utf-8").splitlines()
    for command in FRESH_MACHINE:
        assert command in lines, f"README.md lost the line {command!r} (.ci/run runs the second)"


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    bad = []
    for target in LINK.findall(_prose(path.read_text(encoding="utf-8"))):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        file_part, _, fragment = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            bad.append(f"{target} (no file {dest})")
        elif fragment and dest.suffix == ".md" and fragment not in _anchors(dest):
            bad.append(f"{target} (no heading #{fragment} in {dest.name})")
    assert not bad, f"{path.name}: broken links: {bad}"


def test_readme_links_into_docs():
    links = LINK.findall(_prose(README.read_text(encoding="utf-8")))
    assert any(t.startswith("docs/") and t.endswith(".md") for t in links)
    assert any(t.startswith("docs/img/") for t in links), "the README's picture lives under docs/img/"


def test_docs_index_lists_every_page():
    index = (DOCS / "index.md").read_text(encoding="utf-8")
    for page in sorted(DOCS.glob("*.md")):
        if page.name != "index.md":
            assert f"({page.name})" in index, f"docs/index.md does not link {page.name}"


def test_configuration_doc_covers_every_knob():
    """Every key of every [section] of rtsort.config appears in that section of docs/configuration.md."""
    text = (DOCS / "configuration.md").read_text(encoding="utf-8")
    missing = []
    for section in dataclasses.fields(Config):
        m = re.search(rf"^## `\[{section.name}\]`$(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
        if m is None:
            missing.append(f"[{section.name}]")
            continue
        for key in dataclasses.fields(getattr(Config(), section.name)):
            if f"`{key.name}`" not in m.group(1):
                missing.append(f"{section.name}.{key.name}")
    assert not missing, f"docs/configuration.md does not describe {missing}"


def test_cli_doc_covers_every_command_and_option():
    """docs/cli.md (tools/gen_cli_doc.py) names every subcommand and every option the parser has."""
    import argparse

    from rtsort.cli import build_parser

    text = (DOCS / "cli.md").read_text(encoding="utf-8")
    missing = []
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in [("", parser)] + list(sub.choices.items()):
        if name and f"## `rtsort {name}`" not in text:
            missing.append(name)
        missing += [f"{name} {o}" for a in p._actions for o in a.option_strings if o not in text]
    assert not missing, f"docs/cli.md is out of date (python tools/gen_cli_doc.py): {missing}"


def test_version():
    res = subprocess.run([sys.executable, "-m", "rtsort", "--version"], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "rtsort 0.2.0" == f"rtsort {rtsort.__version__}"


def test_changelog_has_this_version():
    text = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    versions = re.findall(r"^## \[?(\d+\.\d+\.\d+)", text, flags=re.M)
    assert versions and versions[0] == rtsort.__version__, f"CHANGELOG.md's newest entry is {versions[:1]}"


def test_no_development_history_in_tracked_text():
    git = shutil.which("git")
    if git is None or not (ROOT / ".git").exists():
        pytest.skip("git or the repository is not available")
    res = subprocess.run([git, "grep", "-n", "-i", "-E", "session [0-9]"], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    assert res.returncode in (0, 1), res.stderr
    assert res.stdout == "", f"development history ('session N') in tracked files:\n{res.stdout}"
