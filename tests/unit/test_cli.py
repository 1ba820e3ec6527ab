"""The command line: each command imports only what it uses."""

import subprocess

import pytest


def test_help_imports_nothing_heavy(modules_loaded_by):
    assert modules_loaded_by(["--help"])[0] == set()


def test_inspect_reads_headers_without_numpy_or_astropy(tmp_path, modules_loaded_by):
    (tmp_path / "x.fits").write_bytes(b"SIMPLE  =                    T" + b" " * 50 + b"END".ljust(80) + b" " * (2880 - 160))
    assert modules_loaded_by(["inspect", str(tmp_path)])[0] == set()


def test_config_check_needs_no_numerics(tmp_path, modules_loaded_by):
    rules = tmp_path / "r.yaml"
    rules.write_text("capture:\n  - path: /x\n")
    assert modules_loaded_by(["config", "check", str(rules)])[0] <= {"pydantic"}


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


# --------------------------------------------------------------------------- retry


def _retry_setup(tmp_path):
    from flatd.ledger import FAILED, Ledger

    (tmp_path / "cap").mkdir()
    config = tmp_path / "flatd.yaml"
    config.write_text(f"capture:\n  - path: {tmp_path / 'cap'}\nstate: {tmp_path / 'state'}\n")
    ledger = Ledger.open(tmp_path / "state")
    ledger.plan_job("abc123", "1x1 R", None, tmp_path / "cap", tmp_path / "cap" / "masters", "M.fits", [])
    ledger.set_state("abc123", FAILED, "no dark")
    ledger.close()
    return config


def _job(tmp_path, job_id="abc123"):
    from flatd.ledger import Ledger

    ledger = Ledger.open_readonly(tmp_path / "state")
    try:
        return ledger.job(job_id)
    finally:
        ledger.close()


def test_retry_puts_a_failed_job_back(tmp_path, capsys):
    from flatd.cli import main

    config = _retry_setup(tmp_path)
    assert main(["retry", "--config", str(config), "abc"]) == 0
    assert "1 failed job(s) put back" in capsys.readouterr().out
    assert _job(tmp_path) is None


def test_retry_refuses_while_a_service_holds_the_state_lock(tmp_path, capsys):
    import os

    from flatd.cli import main
    from flatd.ledger import StateLock

    config = _retry_setup(tmp_path)
    with StateLock(tmp_path / "state"):  # what `flatd watch` holds for its life
        assert main(["retry", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"a flatd service (pid {os.getpid()}) holds the state lock" in err and "stop it or wait" in err
    assert _job(tmp_path).state == "failed"  # nothing changed behind the service's back


@pytest.mark.parametrize("job", ["%", "_", "", "a%", "ab_"])
def test_retry_takes_a_job_id_literally_never_as_a_pattern(tmp_path, capsys, job):
    """`flatd retry "$JOB"` with an empty variable, or a `%` or `_`, puts back no job:
    they are not the first characters of a job id (ids are lower-case hex)."""
    from flatd.cli import main

    config = _retry_setup(tmp_path)
    assert main(["retry", "--config", str(config), job]) == 1
    assert "no job" in capsys.readouterr().err
    assert _job(tmp_path).state == "failed"


def test_retry_of_an_unknown_job_exits_1_saying_so(tmp_path, capsys):
    from flatd.cli import main

    config = _retry_setup(tmp_path)
    assert main(["retry", "--config", str(config), "zzz"]) == 1
    assert "no job zzz in the ledger" in capsys.readouterr().err
    assert _job(tmp_path).state == "failed"


# --------------------------------------------------------------------------- --version, config show, state


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version(flag, capsys):
    from flatd import __version__
    from flatd.cli import main

    assert main([flag]) == 0
    assert capsys.readouterr().out.strip() == f"flatd {__version__}"


def test_config_show_prints_every_default_and_resolves_paths(tmp_path, capsys):
    import yaml

    from flatd.cli import main
    from flatd.config import Rules, load_rules

    rules = tmp_path / "r.yaml"
    rules.write_text("capture:\n  - path: cap\nstate: st\nsettle: 2m\n")
    assert main(["config", "show", str(rules)]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["capture"][0] == {"path": f"{tmp_path}/cap", "recursive": True, "poll": "auto",
                                   "follow_symlinks": False}
    assert shown["state"] == f"{tmp_path}/st" and shown["settle"] == 120
    assert set(shown) == set(Rules.model_fields) and shown["grouping"]["min_group_size"] == 5
    again = tmp_path / "again.yaml"
    again.write_text(yaml.safe_dump(shown))
    assert load_rules(again).model_dump() == load_rules(rules).model_dump(), "the output is a rules file itself"


def test_config_show_without_a_file_shows_the_built_in_defaults(tmp_path, capsys, monkeypatch):
    from flatd import config
    from flatd.cli import main

    monkeypatch.delenv("FLATD_CONFIG", raising=False)
    monkeypatch.setattr(config, "DEFAULT_CONFIG_PATHS", (tmp_path / "none.yaml",))
    assert main(["config", "show"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# flatd config show: no rules file") and "min_group_size: 5" in out


@pytest.mark.parametrize("text, where", [
    ("capture: [{path: /x}]\ngrouping:\n  temperature: 99\n", ":3: at 'grouping.temperature'"),
    ("capture: [{path: /x}]\nstate: *a\n", ":2: at '(syntax)'"),
    ("name: \"\\e[31mred\\u0007\"\n", ":1: at 'name': unknown key"),
])
def test_config_show_of_a_bad_file_prints_the_errors_and_exits_2(tmp_path, capsys, text, where):
    from flatd.cli import main

    rules = tmp_path / "r.yaml"
    rules.write_text(text)
    assert main(["config", "show", str(rules)]) == 2
    captured = capsys.readouterr()
    assert f"{rules}{where}" in captured.err and captured.out == ""


def test_config_show_escapes_control_characters(tmp_path, capsys):
    """Header-like text with escapes stays on one line, quoted: the output is still YAML."""
    import yaml

    from flatd.cli import main

    rules = tmp_path / "r.yaml"
    rules.write_text('capture: [{path: /x}]\noutput:\n  name: "M-{filter}\\e[2J\\n.fits"\n')
    assert main(["config", "show", str(rules)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and yaml.safe_load(out)["output"]["name"] == "M-{filter}\x1b[2J\n.fits"


def _rules_with_state(tmp_path, state: str):
    (tmp_path / "cap").mkdir(exist_ok=True)
    rules = tmp_path / "r.yaml"
    rules.write_text(f"capture:\n  - path: cap\nstate: {state}\n")
    return rules


@pytest.mark.parametrize("state, says", [
    ("afile", "is a file, not a folder"),
    ("afile/state", "cannot be made: {tmp}/afile is a file"),
    ('"bad\\0path"', "not a usable path"),
    ("x" * 5000, "not a usable path (File name too long)"),
])
@pytest.mark.parametrize("argv", [["config", "check"], ["run-once", "--dry-run", "--config"],
                                  ["run-once", "--config"]])
def test_an_unusable_state_folder_names_the_key_and_exits_2(tmp_path, capsys, state, says, argv):
    from flatd.cli import main

    (tmp_path / "afile").write_text("not a folder")
    rules = _rules_with_state(tmp_path, state)
    assert main([*argv[:-1], argv[-1], str(rules)] if argv[-1] == "--config" else [*argv, str(rules)]) == 2
    err = capsys.readouterr().err
    assert "at 'state': " in err and says.format(tmp=tmp_path) in err
    assert "Traceback" not in err and not (tmp_path / "afile" / "state").exists()


def test_a_read_only_state_folder_is_refused_but_status_reads_it(tmp_path, capsys):
    import os

    from flatd.cli import main

    state = tmp_path / "ro"
    state.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(state)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {mounted.stderr.strip()}")
    try:
        assert not os.access(state, os.W_OK)
        rules = _rules_with_state(tmp_path, str(state))
        assert main(["config", "check", str(rules)]) == 2
        assert main(["run-once", "--dry-run", "--config", str(rules)]) == 2
        assert f"at 'state': {state} is not writable" in capsys.readouterr().err
        assert main(["status", "--config", str(rules)]) == 0
    finally:
        subprocess.run(["umount", "-l", str(state)], check=False)


def test_status_of_a_state_option_that_is_a_file_says_so(tmp_path, capsys):
    """`flatd status --state F` with F a file is a usage error, not "no ledger yet"."""
    from flatd.cli import main

    (tmp_path / "afile").write_text("not a folder")
    assert main(["status", "--state", str(tmp_path / "afile")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'afile'} is a file, not a folder" in err
    assert main(["status", "--state", str(tmp_path / "not-yet")]) == 0  # made at the first run
    assert "no ledger yet" in capsys.readouterr().out


def test_config_check_of_an_empty_file_says_no_capture_folder(tmp_path, capsys):
    from flatd.cli import NO_CAPTURE, main

    rules = tmp_path / "r.yaml"
    rules.write_text("")
    assert main(["config", "check", str(rules)]) == 2
    captured = capsys.readouterr()
    assert NO_CAPTURE in captured.err and "valid" not in captured.out
    assert main(["run-once", "--config", str(rules)]) == 2
    assert NO_CAPTURE in capsys.readouterr().err


def test_inspect_of_a_missing_path_exits_1(tmp_path, capsys):
    from flatd.cli import main

    (tmp_path / "x.fits").write_bytes(b"SIMPLE  =                    T" + b" " * 50 + b"END".ljust(80) + b" " * (2880 - 160))
    assert main(["inspect", str(tmp_path)]) == 0
    assert main(["inspect", str(tmp_path), str(tmp_path / "gone.fits")]) == 1
    assert "gone.fits" in capsys.readouterr().out
