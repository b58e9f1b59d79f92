"""Run the shard scripts' main() in this process (the interpreter start-up of a subprocess costs more than
the commands tested); the SIGKILL test still runs a real subprocess."""

import runpy

from tests.repo import REPO


def script_main(name: str):
    return runpy.run_path(str(REPO / "shards" / name), run_name=f"shards_{name[:-3]}")["main"]


def run_script(capsys, name: str, *args: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `python shards/<name> args...`."""
    try:
        code = script_main(name)(list(args))
    except SystemExit as exit_:  # argparse: --help, invalid choices
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err
