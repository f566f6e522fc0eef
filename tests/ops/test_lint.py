"""The operations scripts parse and are shellcheck-clean; the Makefile has the agreed targets."""

import shutil
import subprocess

import pytest
from opskit import REPO, show

SCRIPTS = [
    *(REPO / "scripts" / n for n in ("control_proxy.sh", "control_lb.sh", "install.sh")),
    REPO / "scripts" / "zk_throwaway.sh",
    REPO / "examples" / "calculator" / "run.sh",
]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_parses(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, show(result)
    assert script.read_text().startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in script.read_text()


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_is_shellcheck_clean(script):
    exe = shutil.which("shellcheck")
    if exe is None:
        pytest.skip("shellcheck not installed (Debian package `shellcheck`)")
    result = subprocess.run([exe, "-x", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, show(result)


@pytest.mark.parametrize(
    ("target", "command"),
    [
        ("build", "cargo build --workspace --release --bins"),
        ("test", "scripts/test.sh"),
        ("demo", "scripts/demo.sh"),
        ("install", "scripts/install.sh"),
        ("check", "cargo clippy --workspace --all-targets -- -D warnings"),
        ("ops-test", "pytest -q tests/ops"),
    ],
)
def test_makefile_target(target, command):
    if shutil.which("make") is None:
        pytest.skip("make not installed")
    result = subprocess.run(["make", "-n", target], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, show(result)
    assert command in result.stdout


def test_makefile_check_covers_fmt_and_ruff():
    text = (REPO / "Makefile").read_text()
    assert "cargo fmt --all -- --check" in text
    assert "ruff check" in text and "ruff format --check" in text
