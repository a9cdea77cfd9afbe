"""The README's first screen is a guide, its links hold, the docs site lists every page, and every command's
options are documented on its page. (`make docs` builds the site with --strict, which checks the links inside it.)"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from esm2cli.cli import cli

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
FIRST_SCREEN = "\n".join(README.splitlines()[:45])
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# A command documented on another command's page: docs/index.md is the site's home, so index shares search's.
PAGES = {"index": "search"}


def test_readme_opens_with_the_two_commands_that_set_themselves_up():
    first_block = re.search(r"```bash\n(.*?)```", README, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.splitlines()]
    assert commands == ["make demo", "make test"]
    assert "RANDOM weights" in first_block and "examples/demo.fasta" in first_block  # said plainly


def test_readme_first_screen_says_what_to_do_next():
    for needed in (
        ".venv/bin/esm2cli --help",  # esm2cli is not on PATH after make demo
        "source .venv/bin/activate",
        "esm2cli download esm2_t33_650M",  # real weights, once
        "--to ",  # into a local directory
        "HF_HUB_OFFLINE=1",  # then offline
        ".pt",  # fair-esm checkpoints
        CPU_INDEX,  # the CPU-only torch
    ):
        assert needed in FIRST_SCREEN, needed


def test_every_command_has_a_line_on_the_first_screen_and_a_page():
    for name in cli.commands:
        page = ROOT / "docs" / f"{PAGES.get(name, name)}.md"
        assert page.exists(), page
        assert f"[`esm2cli {name}`](docs/{PAGES.get(name, name)}.md)" in FIRST_SCREEN, name


def _links(markdown: str) -> list[str]:
    return re.findall(r"\]\(([^)\s]+)\)", markdown)


def _anchors(markdown: str) -> set[str]:
    headings = re.findall(r"^#+ (.*)$", markdown, re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_readme_links_resolve():
    for link in _links(README):
        if link.startswith(("http://", "https://")):
            continue
        path, _, anchor = link.partition("#")
        target = ROOT / path if path else ROOT / "README.md"
        assert target.exists(), link
        if anchor:
            assert anchor in _anchors(target.read_text()), link


def _nav_pages(nav) -> list[str]:
    pages = []
    for entry in nav:
        for value in entry.values():
            pages += _nav_pages(value) if isinstance(value, list) else [value]
    return pages


def test_site_nav_lists_every_page_once():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    pages = _nav_pages(config["nav"])
    assert sorted(pages) == sorted(p.name for p in (ROOT / "docs").glob("*.md"))
    assert len(pages) == len(set(pages))
    plugins = [p if isinstance(p, str) else next(iter(p)) for p in config.get("plugins", [])]
    assert set(plugins) <= {"search"}  # the build must work offline: no plugin that fetches
    assert config["strict"] is True


@pytest.mark.parametrize("name", sorted(cli.commands))
def test_every_option_is_on_its_commands_page(name):
    page = (ROOT / "docs" / f"{PAGES.get(name, name)}.md").read_text()
    for param in cli.commands[name].params:
        flags = [o for o in param.opts + param.secondary_opts if o.startswith("-")]
        if flags and "--help" not in flags:  # the long or the short form, as code
            assert any(re.search(rf"`{re.escape(o)}\b", page) for o in flags), f"{name}: {flags} not on its page"


def _make_dry_run(target: str, *variables: str) -> str:
    """The commands `make TARGET` would run on a fresh clone (a venv that does not exist yet)."""
    done = subprocess.run(["make", "-n", target, "VENV=/nonexistent/venv", *variables], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_demo_installs_the_runtime_only_and_test_the_dev_tools():
    demo, test = _make_dry_run("demo"), _make_dry_run("test")
    assert "-c constraints.txt -e ." in demo and ".[dev]" not in demo and "index-url" not in demo
    assert '-c constraints.txt -e ".[dev]"' in test
    cpu = _make_dry_run("demo", f"TORCH_INDEX_URL={CPU_INDEX}")
    assert f"--index-url {CPU_INDEX}" in cpu and "torch==" in cpu  # the pinned torch, from the CPU index


def test_the_chunk_figures_in_the_docs_are_the_configured_ones():
    """The chunk bound is written once (config.CHUNK_BYTES); the pages that quote it say the same figure."""
    from esm2cli.config import CHUNK_BYTES, DEFAULT_CHUNK_SIZE

    embed = (ROOT / "docs" / "embed.md").read_text()
    quoted = set(re.findall(r"(\d+) MB of embeddings", embed))
    assert quoted == {str(CHUNK_BYTES >> 20)}, quoted
    assert f"`--chunk-size` ({DEFAULT_CHUNK_SIZE:,})" in embed
