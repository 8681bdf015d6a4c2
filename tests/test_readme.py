"""The README and docs/ are part of the interface: the flag table (docs/flags.md), the README's modes and
commands must match the code and CI."""
from __future__ import annotations

import re

from conftest import REPO

from optqa.config import MODES, markdown_table

README = (REPO / "README.md").read_text(encoding="utf-8")
FLAGS_PAGE = REPO / "docs" / "flags.md"


def test_flag_table_is_generated_from_the_config():
    """docs/flags.md holds the flag table between its markers, exactly as optqa.config renders it."""
    text = FLAGS_PAGE.read_text(encoding="utf-8")
    table = text.split("<!-- flags:start -->\n", 1)[1].split("<!-- flags:end -->", 1)[0].strip()
    assert table == markdown_table(), "paste the output of python -m optqa.config into docs/flags.md"


def test_every_mode_is_documented():
    missing = [mode for mode in MODES if f"| `{mode}` |" not in README]
    assert not missing


def test_ci_runs_the_readme_test_command_after_pinning_torch():
    commands = re.findall(r"```bash\n(.*?)\n```", README, flags=re.S)
    setup, test_command = commands[0], commands[1]
    assert setup.startswith("pip install torch==2.13.0 && pip install -c constraints.txt -e ")
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert test_command in ci.splitlines()
    # a fresh venv first, then the same installs as the README, then its test command
    assert (ci.index("python3 -m venv") < ci.index("torch==2.13.0") < ci.index('-c constraints.txt -e ".[dev,plot]"')
            < ci.index(test_command))


def test_constraints_pin_what_setup_py_allows():
    """Every pinned direct requirement lies inside setup.py's range: the tested set is an installable set."""
    from importlib.metadata import requires

    from packaging.requirements import Requirement

    pins = {}
    for line in (REPO / "constraints.txt").read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version
    direct = [Requirement(r) for r in requires("optqa")]
    for requirement in direct:
        name = requirement.name.lower().replace("_", "-")
        assert name in pins, f"{name} is not pinned in constraints.txt"
        assert requirement.specifier.contains(pins[name], prereleases=True), (name, pins[name], requirement)


def _anchor(heading: str) -> str:
    """GitHub's (and MkDocs') anchor for a markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_in_the_readme_and_architecture_lead_somewhere():
    """README.md and ARCHITECTURE.md are read on GitHub, outside the MkDocs build that checks docs/: each relative
    link names a file of the repository, and an anchor a heading of that file."""
    for name in ("README.md", "ARCHITECTURE.md"):
        text = (REPO / name).read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            linked = REPO / path if path else REPO / name
            assert linked.exists(), f"{name}: {target} does not exist"
            if anchor:
                headings = re.findall(r"^#+ (.*)$", linked.read_text(encoding="utf-8"), flags=re.M)
                assert anchor in {_anchor(h) for h in headings}, f"{name}: {target} names no heading"
