"""CI runs the README's test command, so the two cannot drift apart."""
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    test_command = next(line for line in readme.splitlines() if line.endswith("python -m pytest tests"))
    assert test_command in ci.splitlines()


def test_ci_runs_the_readme_sanitized_command():
    readme = (ROOT / "README.md").read_text().splitlines()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    start = readme.index("# the CUDA tests under AddressSanitizer and UBSan, threads in random order (CI runs this after the tests)")
    command = readme[start + 1:readme.index("```", start)]
    assert len(command) == 3 and all(line in ci for line in command)
