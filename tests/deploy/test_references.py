"""Every file the documentation and the code's docstrings and comments point to is in the repository.

Checked: repository paths (``gateway/…``, ``tests/…``, ``bench/…``, ``docs/…``, ``deploy/…``, ``scripts/…``) named
anywhere in a tracked text file, and relative Markdown links. A path may also name the stem of files that exist
(``bench/results/capacity_check`` for its ``.md`` and ``.json``), or a Python module without ``.py``.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from tests.deploy.tools import ROOT

TEXT_SUFFIXES = {".py", ".md", ".yml", ".yaml", ".toml", ".sh", ".txt", ".cfg", ".ini"}
REPO_PATH = re.compile(r"(?<![\w./-])((?:gateway|tests|bench|docs|deploy|scripts)/[\w./-]*\w)")
MARKDOWN_LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")

ELSEWHERE = {
    "tests/v1/kv_connector/nixl_integration/toy_proxy_server.py": "a file of vLLM's repository, cited as a source",
    "bench/.venv-sglang-router": "the virtual environment bench/peer_router.py creates",
    "bench/.venv-smg": "the virtual environment bench/smg_router.py creates",
    "bench/.venv-vllm-router": "the virtual environment bench/smg_pd.py creates for vllm-router",
    "bench/results/tmp": "scratch output of the benchmarks, ignored by git",
    "bench/results/ablation-4x8": "an output name in an example command of bench/ablation.py",
}
"""Paths that are not meant to be in this repository, with the reason."""


NOT_CHECKED = ("gateway/data/", "CHANGELOG.md")
"""Verbatim copies of the data sets' own documentation, whose links point into the publishers' repositories; and
the changelog, which names what moved or went away."""


def tracked_text_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    names = [name for name in listed.split() if not name.startswith(NOT_CHECKED)]
    return [ROOT / name for name in names if Path(name).suffix in TEXT_SUFFIXES or "/" not in name]


def resolves(path: Path, tracked: set[Path]) -> bool:
    if path.exists() or path.with_suffix(".py").exists():
        return True
    return any(str(other).startswith(f"{path}.") or str(other).startswith(f"{path}_") for other in tracked)


def test_every_referenced_path_is_in_the_repository() -> None:
    files = tracked_text_files()
    tracked = set(files)
    missing: list[str] = []
    for file in files:
        text = file.read_text(errors="replace")
        for match in REPO_PATH.finditer(text):
            reference = match.group(1).rstrip(".")
            if reference not in ELSEWHERE and not resolves(ROOT / reference, tracked):
                missing.append(f"{file.relative_to(ROOT)}: {reference}")
        if file.suffix == ".md":
            for match in MARKDOWN_LINK.finditer(text):
                target = match.group(1)
                if "://" in target or target.startswith("mailto:"):
                    continue
                if not (file.parent / target).exists():
                    missing.append(f"{file.relative_to(ROOT)}: link {target}")
    assert missing == []
