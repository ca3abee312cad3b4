import json
import subprocess
import sys

from pipeline.cli import build_parser, main


def test_help_lists_commands():
    text = build_parser().format_help()
    for cmd in ["demo-data", "ingest", "features", "proxy", "demo", "config"]:
        assert cmd in text


def test_every_command_has_config_and_json():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():
        opts = {o for a in p._actions for o in a.option_strings}
        assert {"--config", "--json"} <= opts, name


def test_config_command_prints_json(capsys):
    assert main(["config", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["storage"]["root"]


def test_bad_config_exits_2_with_field(tmp_path, capsys):
    f = tmp_path / "bad.yaml"
    f.write_text("audio:\n  sample_rate: 10\n")
    assert main(["config", "--config", str(f)]) == 2
    assert "audio.sample_rate" in capsys.readouterr().err


def test_console_script_installed():
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "asr-retune" in out.stdout
