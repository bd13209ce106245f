"""Every code block in README.md and docs/ runs as written, and every internal link resolves.

Conventions (docs/index.md says the same to writers):
* A ```python block runs; the blocks of one page run in order in one fresh interpreter, in a
  temporary folder, so a later block may use what an earlier one defined.
* A ```bash block runs when each of its command lines is a `mixprec` command (a leading
  `$ ` is allowed; `#` comments are ignored); each command must exit 0.
* A block that must not run here (it needs a GPU, torchrun, the network, or minutes) is
  preceded by the line `<!-- not run: REASON -->`; a block in any other language (text,
  console output, json) is not code and is not run.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```\s*$", re.S | re.M)
NOT_RUN = re.compile(r"<!--\s*not run:\s*\S.*-->\s*$")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    skipped: bool


def blocks(page: Path) -> list[Block]:
    text = page.read_text()
    out = []
    for m in FENCE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        out.append(Block(page, line, m.group(1), m.group(2), bool(NOT_RUN.search(before))))
    return out


def rel(page: Path) -> str:
    return str(page.relative_to(ROOT))


def shell_commands(block: Block) -> list[str] | None:
    """The mixprec commands of a bash block, or None when it holds anything else."""
    cmds = []
    for raw in block.code.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        line = line.removeprefix("$ ")
        if not line.startswith("mixprec"):
            return None
        cmds.append(line.split("  #", 1)[0].strip())
    return cmds


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), e.get("PYTHONPATH")]))
    e.setdefault("MPLBACKEND", "Agg")
    return e


PY_PAGES = [p for p in PAGES if any(b.lang == "python" and not b.skipped for b in blocks(p))]
SH_BLOCKS = [b for p in PAGES for b in blocks(p) if b.lang in ("bash", "sh") and not b.skipped]


@pytest.mark.parametrize("page", PY_PAGES, ids=rel)
def test_python_blocks_run(page, tmp_path):
    parts = [f"# --- {rel(page)}:{b.line}\n{b.code}" for b in blocks(page)
             if b.lang == "python" and not b.skipped]  # fmt: skip
    script = tmp_path / "page.py"
    script.write_text("\n".join(parts))
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env(),
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, f"{rel(page)}: a python block failed\n{r.stderr[-4000:]}"


@pytest.mark.parametrize("block", SH_BLOCKS, ids=lambda b: f"{rel(b.page)}:{b.line}")
def test_shell_blocks_run_or_are_marked(block, tmp_path):
    cmds = shell_commands(block)
    assert cmds is not None, (
        f"{rel(block.page)}:{block.line}: a bash block with commands other than mixprec must be "
        "preceded by '<!-- not run: REASON -->'"
    )
    for cmd in cmds:
        argv = shlex.split(cmd)
        argv[0] = str(BIN / "mixprec")
        r = subprocess.run(argv, cwd=tmp_path, env=env(), capture_output=True, text=True,
                           timeout=600)  # fmt: skip
        assert r.returncode == 0, f"{rel(block.page)}:{block.line}: `{cmd}`\n{r.stderr[-3000:]}"


def slug(heading: str) -> str:
    """The anchor Python-Markdown's toc extension (mkdocs) gives a heading."""
    s = re.sub(r"[^\w\s-]", "", heading.strip().lower())
    return re.sub(r"[\s-]+", "-", s).strip("-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M)}


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_internal_links_resolve(page):
    text = FENCE.sub("", page.read_text())
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue  # http:, https:, mailto:
        path, _, frag = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(target)
        elif frag and dest.suffix == ".md" and frag not in anchors(dest):
            broken.append(target)
    assert not broken, f"{rel(page)}: links that do not resolve: {broken}"


def test_docs_conventions_hold():
    """The collector itself: a marked block is skipped, a non-mixprec bash block is refused."""
    page = ROOT / "docs" / "index.md"
    got = blocks(page)
    assert any(b.skipped for b in got) and any(not b.skipped for b in got)
    fake = Block(page, 1, "bash", "pip install mixprec\n", False)
    assert shell_commands(fake) is None
    assert shell_commands(Block(page, 1, "bash", "$ mixprec formats  # all\n", False)) == [
        "mixprec formats"
    ]
