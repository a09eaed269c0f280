"""SIGKILL at a random time, during a checkpoint write and during evaluation; the rerun must equal
a clean run (``tests/fault_injection.py --kills 10`` runs the full harness)."""

from tests.fault_injection import main


def test_killed_runs_resume_to_the_uninterrupted_result(tmp_path, capsys):
    assert main(["--kills", "3", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "kill 3" in printed and "DIFFER" not in printed
    for kind in ("random kill", "checkpoint kill", "evaluation kill"):
        assert kind in printed
