"""README.md: the two set-up commands come first, and the configuration table names every
setting the API and the worker read."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def test_first_block_is_exactly_the_two_setup_commands():
    first = re.search(r"```bash\n(.*?)```", README, re.DOTALL)
    assert first is not None and README.index(first.group(0)) < README.index("\n## ")
    commands = [line.split("#")[0].strip() for line in first.group(1).splitlines()]
    assert commands == ["make demo", "make test"]


def test_every_setting_is_in_the_one_configuration_table():
    from app.core.config import Settings
    from worker.settings import WorkerSettings

    section = README.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    table = {m for m in re.findall(r"^\| `(SLIMGPT_[A-Z0-9_]+)`", section, re.MULTILINE)}
    names = {f"SLIMGPT_{n.upper()}" for n in Settings.model_fields}
    names |= {f"SLIMGPT_{n.upper()}" for n in WorkerSettings.model_fields}
    assert names <= table, sorted(names - table)


def test_cli_commands_in_the_readme_exist():
    from app.cli import command

    commands = command().commands
    for name in ("serve", "db", "keys", "worker", "submit", "batch", "status", "list",
                 "cancel", "logs", "download", "artifacts", "estimate", "files", "hub-token",
                 "ready", "prune", "demo", "dispatcher"):
        assert name in commands
        assert f"slimgpt {name}" in README
