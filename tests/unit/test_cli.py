"""cli.py: flags to Settings, and the refusals that keep a weak setup from starting by accident."""

from __future__ import annotations

import os

import pytest

from mcp_codeexec import __version__, cli
from mcp_codeexec.config import Settings
from mcp_codeexec.deployment.local import default_dir


def settings(*argv: str) -> Settings:
    return cli.settings_from(cli.parser().parse_args(list(argv)))


def test_defaults_are_the_settings_defaults() -> None:
    assert settings() == Settings(prepare_session=True)


def test_flags_map_to_settings(tmp_path: object) -> None:
    s = settings(
        "--memory", "1g", "--cpus", "2", "--pids", "99", "--disk", "0", "--timeout", "7.5", "--max-output", "64k",
        "--tmp-size", "1m", "--profile", "20260521", "--cell-timeout", "12", "--tenant", "team-a", "--container",
        "container_" + "a" * 24, "--lifetime", "1h", "--idle-stop", "90s", "--max-running", "3", "--pool", "2",
        "--upload", "/etc/hostname:ro", "--upload", "/etc/hosts", "--max-file-size", "1m", "--max-stored", "2m",
        "--file-retention", "2d", "--transport", "http", "--host", "0.0.0.0", "--port", "9", "--public-url",
        "https://x.example", "--allowed-host", "x.example", "--max-upload", "3m", "--reap-interval", "5s",
        "--workdir", "/data", "--image", "img:1", "--data-dir", "/d",
    )
    assert (s.memory_bytes, s.cpus, s.pids_limit, s.disk_bytes, s.timeout, s.max_output_bytes) == (1 << 30, 2.0, 99, 0, 7.5, 65536)
    assert (s.tmp_bytes, s.profile, s.cell_timeout, s.tenant, s.container) == (1 << 20, "20260521", 12.0, "team-a", "container_" + "a" * 24)
    assert (s.lifetime, s.idle_stop, s.max_running, s.pool_size, s.reap_interval) == (3600.0, 90.0, 3, 2, 5.0)
    assert s.uploads == ("/etc/hostname:ro", "/etc/hosts")
    assert (s.max_file_bytes, s.max_stored_bytes, s.file_retention, s.max_upload_bytes) == (1 << 20, 2 << 20, 172800.0, 3 << 20)
    assert (s.transport, s.host, s.port, s.public_url, s.allowed_hosts) == ("http", "0.0.0.0", 9, "https://x.example", ("x.example",))
    assert (s.workdir, s.image, s.data_dir) == ("/data", "img:1", "/d")
    assert not s.prepare_session  # over HTTP there is no one session to prepare


def test_no_prepare() -> None:
    assert not settings("--no-prepare").prepare_session
    assert settings().zygote and not settings("--no-zygote").zygote


def test_a_runtime_other_than_runsc_needs_consent() -> None:
    with pytest.raises(SystemExit, match="refusing runtime 'runc'"):
        settings("--runtime", "runc")
    assert settings("--runtime", "runc", "--allow-weak-isolation").runtime == "runc"


def test_local_backend_needs_consent_and_works_in_its_directory(tmp_path: object) -> None:
    with pytest.raises(SystemExit, match="refusing --backend local.*--allow-weak-isolation"):
        settings("--backend", "local")
    s = settings("--backend", "local", "--allow-weak-isolation")
    assert (s.backend, s.local_dir, s.workdir) == ("local", "", os.path.realpath(os.path.join(default_dir(), "workspace")))
    s = settings("--backend", "local", "--allow-weak-isolation", "--local-dir", "rel/dir")
    assert s.local_dir == os.path.abspath("rel/dir") and s.workdir == os.path.realpath("rel/dir/workspace")
    assert settings("--backend", "local", "--allow-weak-isolation", "--workdir", "/tmp/../tmp/w").workdir == "/tmp/w"


@pytest.mark.parametrize(
    "argv",
    [("--backend", "nomad"), ("--profile", "20990101"), ("--transport", "ws"), ("--pool", "many"), ("--bogus",)],
)
def test_bad_flags_are_refused_by_the_parser(argv: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.parser().parse_args(list(argv))
    assert exit_.value.code == 2 and "error:" in capsys.readouterr().err


@pytest.mark.parametrize(("flag", "value", "says"), [("--memory", "lots", "not a size"), ("--lifetime", "1w", "not a duration"),
                                                     ("--max-output", "1000", "greater than or equal to 1024")])
def test_bad_values_are_refused(flag: str, value: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        settings(flag, value)


def test_main_version_and_refusal(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"mcp-codeexec {__version__}"
    with pytest.raises(SystemExit, match="refusing --backend local"):
        cli.main(["--backend", "local"])


@pytest.mark.parametrize(("argv", "says"), [(["--memory", "lots"], "not a size: 'lots'"),
                                           (["--upload", "/nonexistent/x"], "no such file or directory"),
                                           (["--timeout", "0"], "greater than 0")])
def test_main_refuses_bad_values_with_a_message_not_a_traceback(argv: list[str], says: str) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert isinstance(exit_.value.code, str) and exit_.value.code.startswith("mcp-codeexec: ") and says in exit_.value.code
