"""CI must run exactly what the README tells a newcomer to run."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    blocks = ROOT.joinpath("README.md").read_text().split("```bash\n")[1:3]
    return [block.split("\n```")[0].strip() for block in blocks]


def test_ci_runs_the_readme_install_and_test_commands_verbatim():
    install, test = readme_commands()
    ci_lines = [line.strip() for line in ROOT.joinpath(".ci/run").read_text().splitlines()]
    assert "pip install torch==2.13.0" in install and "flora demo" in install
    assert "pytest" in test
    assert install in ci_lines and test in ci_lines
    assert ci_lines.index(install) < ci_lines.index(test)
