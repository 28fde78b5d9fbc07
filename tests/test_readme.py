from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_command():
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    command = ci[-1]
    assert command.startswith("pip install") and command.endswith("pytest -q")
    assert command in (ROOT / "README.md").read_text(), "README's install-and-test command differs from .ci/run"
