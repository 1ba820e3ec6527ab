"""The command line: each command imports only what it uses."""

import subprocess
import sys

import pytest

HEAVY = ("numpy", "numba", "astropy", "sklearn", "pydantic", "scipy")


def _modules_after(argv: list[str]) -> set[str]:
    code = (
        "import sys\n"
        "from flatd.cli import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
        f"print('LOADED:' + ','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = [line for line in out.splitlines() if line.startswith("LOADED:")][-1]
    return set(filter(None, loaded.removeprefix("LOADED:").split(",")))


def test_help_imports_nothing_heavy():
    assert _modules_after(["--help"]) == set()


def test_inspect_reads_headers_without_numpy_or_astropy(tmp_path):
    (tmp_path / "x.fits").write_bytes(b"SIMPLE  =                    T" + b" " * 50 + b"END".ljust(80) + b" " * (2880 - 160))
    assert _modules_after(["inspect", str(tmp_path)]) == set()


def test_config_check_needs_no_numerics(tmp_path):
    rules = tmp_path / "r.yaml"
    rules.write_text("capture:\n  - path: /x\n")
    assert _modules_after(["config", "check", str(rules)]) <= {"pydantic"}


@pytest.mark.parametrize("argv", [["combine"], ["nonsense"], ["combine", "-s", "x", "f.fits"]])
def test_usage_errors_exit_2(argv, capsys):
    from flatd.cli import main

    assert main(argv) == 2


def test_config_check_warns_about_folders_that_are_not_there(tmp_path, capsys):
    from flatd.cli import main

    (tmp_path / "cap").mkdir()
    rules = tmp_path / "r.yaml"
    rules.write_text("capture:\n  - path: cap\n  - path: gone\nprecalibration: {library: nolib}\n")
    assert main(["config", "check", str(rules)]) == 0
    err = capsys.readouterr().err
    assert f"capture folder {tmp_path}/gone does not exist" in err
    assert f"calibration library {tmp_path}/nolib does not exist" in err
    assert f"{tmp_path}/cap does" not in err
