"""The docs say what the code does: their examples and commands run here.

* Every ```python client example of README.md and docs/api.md is executed against a real
  launched server (the embedded SmolLM2 on CPU), its "http://127.0.0.1:7860/" replaced by the
  test server's URL; the blocks of one page share one namespace, in order.
* Every `python -m steering ...` command line of a ```bash block in README.md and docs/*.md is
  run (in this process, through `steering.__main__.main`) and must exit 0.
* The flags that `python app.py`, `research/quality.py` and `bench/run.py` command lines (and
  synopses) in the docs use exist in those scripts' `--help`.
* README.md stays short (<= 250 lines) with its two commands; every relative link of README.md,
  docs/*.md, research/README.md and bench/README.md points to an existing file (and heading).
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from _server import ROOT, client, launched

DEFAULT_URL = "http://127.0.0.1:7860/"
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS, ROOT / "research" / "README.md", ROOT / "bench" / "README.md"]
EXAMPLE_PAGES = [README, ROOT / "docs" / "api.md"]  # the pages whose ```python blocks are client examples
FENCE = re.compile(r"^```([\w-]*)\n(.*?)^```", flags=re.S | re.M)


def _blocks(path: Path, *languages: str) -> list[str]:
    text = path.read_text(encoding="utf-8")
    return [body for lang, body in FENCE.findall(text) if lang in languages]


def _command_lines(path: Path) -> list[str]:
    """The command lines of a page's ```bash / ```sh / ```console blocks, continuations joined."""
    lines = []
    for block in _blocks(path, "bash", "sh", "console"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip().removeprefix("$ ")
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# -- the client examples, against a real server ---------------------------------------------------
@pytest.fixture(scope="module")
def url(embedded_dir):
    with launched() as local_url:
        yield local_url


@pytest.mark.parametrize("page", EXAMPLE_PAGES, ids=_rel)
def test_client_examples_run_against_a_live_server(url, page):
    blocks = _blocks(page, "python")
    assert blocks, f"{_rel(page)} has no ```python examples"
    assert DEFAULT_URL in blocks[0]  # the first example connects to the default URL
    namespace: dict = {}
    for block in blocks:  # one namespace: later examples reuse the `client` of the first
        exec(compile(block.replace(DEFAULT_URL, url), _rel(page), "exec"), namespace)  # noqa: S102
    if page == README:
        assert namespace["result"]["steered"]


def test_every_endpoint_has_its_section_in_the_api_page(url):
    info = client(url).view_api(print_info=False, return_format="dict")
    text = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    missing = [name for name in info["named_endpoints"] if f"## `{name}`" not in text]
    assert not missing, f"docs/api.md has no section for {missing}"


# -- command lines --------------------------------------------------------------------------------
def _steering_commands() -> list[tuple[str, str]]:
    found = []
    for page in [README, *DOCS]:
        found += [(_rel(page), line) for line in _command_lines(page) if line.startswith("python -m steering ")]
    return found


STEERING_COMMANDS = _steering_commands()


def test_the_docs_show_the_plan_commands():
    assert any("--simulate-gpu 8GiB --gui-overhead 0.7GiB" in line for _, line in STEERING_COMMANDS)


@pytest.mark.parametrize(("page", "line"), STEERING_COMMANDS, ids=[line for _, line in STEERING_COMMANDS])
def test_steering_command_lines_run(page, line, capsys, monkeypatch):
    from steering.__main__ import main

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)  # simulated cards obey it like real ones
    args = shlex.split(line, comments=True)[3:]  # after "python -m steering"
    assert main(args) == 0, f"{page}: {line}"
    out = capsys.readouterr().out
    if "--json" in args:
        json.loads(out)  # exactly one JSON object
    else:
        assert out.strip()


def _help_flags(script: str) -> set[str]:
    done = subprocess.run(
        [sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", done.stdout))


def _flags_in_docs(script: str) -> set[str]:
    """Every --flag of a `python <script> ...` line (or synopsis block) in the docs."""
    flags = set()
    for page in PAGES:
        for _lang, body in FENCE.findall(page.read_text(encoding="utf-8")):
            for chunk in re.split(r"\n(?=\S)", body.replace("\\\n", " ")):  # a command and its indented lines
                if chunk.startswith((f"python {script}", f"python3 {script}")):
                    flags |= set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", chunk.split("#")[0]))
    return flags


@pytest.mark.parametrize("script", ["app.py", "research/quality.py", "bench/run.py"])
def test_documented_flags_exist(script):
    documented = _flags_in_docs(script)
    assert documented, f"no `python {script}` command line in the docs"
    unknown = documented - _help_flags(script)
    assert not unknown, f"the docs give `python {script}` flags it does not have: {sorted(unknown)}"


# -- the README and the links -------------------------------------------------------------------
def test_readme_is_short_and_keeps_its_two_commands():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250
    commands = _command_lines(README)
    assert any(line.startswith("make run") for line in commands)
    assert any(line.startswith("make test") for line in commands)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    return {_slug(h) for h in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


def _links(path: Path) -> list[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    text = re.sub(r"`[^`\n]*`", "", text)  # inline code is not a link
    return re.findall(r"\]\(([^)\s]+)\)", text)


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_relative_links_point_to_existing_files(page):
    broken = []
    for target in _links(page):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        linked = (page.parent / file_part).resolve() if file_part else page
        if not linked.exists():
            broken.append(target)
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
            broken.append(target)
    assert not broken, f"{_rel(page)} links to what does not exist: {broken}"
