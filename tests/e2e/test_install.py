"""The install of docs/services.md, run as written (into a temporary root), and the
units' ExecStart pointing where it puts `flatd`.

The blocks marked `<!-- tested: NAME -->` in docs/services.md are run by bash with
these changes only: `sudo` is dropped; /opt and /usr/local live under a temporary
folder and HOME is a temporary folder; `pip install` gets `--no-deps` (flatd's
dependencies come from the test's own environment through a .pth file, so only the
build backend is fetched from the package index) and `-v` (to see the build's
warnings). `./flatd` is a copy of this checkout, so the build leaves it untouched.
"""

from __future__ import annotations

import os
import plistlib
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from flatd import __version__

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "services.md"
TESTED = re.compile(r"<!-- tested: (\w+)[^>]*-->\s*```sh\n(.*?)```", re.S)

pytestmark = pytest.mark.timeout(180)


def documented_blocks() -> dict[str, str]:
    """The shell blocks of docs/services.md marked as tested, by name."""
    return dict(TESTED.findall(DOC.read_text(encoding="utf-8")))


def exec_programs() -> dict[str, str]:
    """The program each unit starts, as written in it."""
    programs = {}
    for unit in ("flatd.service", "flatd-run-once.service", "flatd-user.service"):
        line = next(l for l in (ROOT / "systemd" / unit).read_text().splitlines() if l.startswith("ExecStart="))
        programs[unit] = line.removeprefix("ExecStart=").split()[0]
    plist = plistlib.loads((ROOT / "launchd" / "org.flatd.watch.plist").read_bytes())
    programs["org.flatd.watch.plist"] = plist["ProgramArguments"][0]
    return programs


def _checkout_copy(tmp: Path) -> None:
    """./flatd: the files a build reads, copied so that the build writes nothing here."""
    dest = tmp / "flatd"
    dest.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    shutil.copytree(ROOT / "flatd", dest / "flatd", ignore=shutil.ignore_patterns("__pycache__"))


def _adapted(block: str, tmp: Path) -> str:
    """The block with the changes the module docstring lists."""
    deps = sysconfig.get_paths()["purelib"]
    site = f"lib/python{sys.version_info.major}.{sys.version_info.minor}/site-packages"
    lines = []
    for line in block.splitlines():
        line = re.sub(r"^sudo ", "", line.strip())
        line = line.replace("/opt/", f"{tmp}/opt/").replace("/usr/local/", f"{tmp}/usr/local/")
        venv = re.match(r"python3 -m venv (\S+)$", line)
        if venv:
            line = (f'"{sys.executable}" -m venv {venv.group(1)} && '
                    f'echo "{deps}" > {venv.group(1)}/{site}/flatd-test-deps.pth')
        lines.append(line.replace("pip install ", "pip install --no-deps -v "))
    return "\n".join(lines)


def run_block(name: str, tmp: Path) -> subprocess.CompletedProcess:
    (tmp / "home").mkdir(exist_ok=True)
    (tmp / "usr" / "local" / "bin").mkdir(parents=True, exist_ok=True)
    if not (tmp / "flatd").exists():
        _checkout_copy(tmp)
    env = {**os.environ, "HOME": str(tmp / "home"), "PIP_DISABLE_PIP_VERSION_CHECK": "1",
           "PIP_CACHE_DIR": os.environ.get("PIP_CACHE_DIR", str(Path.home() / ".cache" / "pip"))}
    env.pop("PYTHONPATH", None)
    script = "set -euo pipefail\n" + _adapted(documented_blocks()[name], tmp)
    return subprocess.run(["bash", "-c", script], cwd=tmp, env=env, capture_output=True, text=True, timeout=170)


def _ran(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout + result.stderr


def test_the_doc_marks_a_system_and_a_user_install():
    assert set(documented_blocks()) == {"system", "user"}
    for block in documented_blocks().values():
        assert "./flatd" in block and "--version" in block
        assert "pip install flatd" not in block and "pipx install flatd" not in block


def test_no_instruction_installs_flatd_from_pypi():
    """flatd is not published: every install line names a checkout."""
    texts = [DOC, ROOT / "README.md", *sorted((ROOT / "systemd").iterdir()), *sorted((ROOT / "launchd").iterdir())]
    for path in texts:
        assert not re.search(r"pip(x)? install (--\S+ )*flatd\b", path.read_text()), path


def _installed_flatd(tmp: Path, program: str) -> Path:
    """A unit's program in the temporary root (%h and /Users/YOU are the home folder)."""
    home = str(tmp / "home")
    program = program.replace("%h", home).replace("/Users/YOU", home)
    return Path(program.replace("/usr/local/", f"{tmp}/usr/local/"))


@pytest.mark.parametrize("name, units", [
    ("system", ("flatd.service", "flatd-run-once.service")),
    ("user", ("flatd-user.service", "org.flatd.watch.plist")),
])
def test_the_documented_install_gives_the_flatd_the_units_start(tmp_path, name, units):
    output = _ran(run_block(name, tmp_path))
    assert f"flatd {__version__}" in output
    assert not re.search(r"(Setuptools)?Deprecation|BuildBackendWarning", output), "the build warns"
    for unit in units:
        program = _installed_flatd(tmp_path, exec_programs()[unit])
        assert program.exists(), f"{unit} starts {program}, which the {name} install does not make"
        shown = subprocess.run([str(program), "-V"], capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert shown.stdout.strip() == f"flatd {__version__}"
    python = next(tmp_path.glob("**/bin/python"))
    where = subprocess.run([str(python), "-c", "import flatd; print(flatd.__file__)"],
                           capture_output=True, text=True, check=True, cwd=tmp_path).stdout
    assert str(tmp_path) in where and str(ROOT) not in where, "the installed flatd, not the checkout"
