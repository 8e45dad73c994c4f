"""benchmarks/gpu_report.py: gpu_check.json after every stage, a budget kill is a failure with a reason."""

import json

from benchmarks import gpu_report


def test_stages_verdict_and_timeout_reason(tmp_path):
    out = str(tmp_path / "gpu_check.json")
    assert gpu_report.main(["init", out, "--mode", "gpu", "--plan", "kernels,tiles,train"]) == 0
    gpu_report.main(["stage", out, "--name", "kernels", "--rc", "0", "--seconds", "12.5", "--budget", "120"])
    r = json.loads(open(out).read())
    assert r["verdict"] == "incomplete" and r["stages"][0]["status"] == "pass"
    gpu_report.main(["stage", out, "--name", "tiles", "--rc", "124", "--budget", "60"])
    r = json.loads(open(out).read())
    assert r["verdict"] == "fail" and "budget of 60 s" in r["stages"][1]["reason"]
    gpu_report.main(["stage", out, "--name", "train", "--skip", "deadline"])
    assert gpu_report.main(["finish", out]) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["gpu_check.json"]  # no temporary file left


def test_expected_skips_pass(tmp_path):
    out = str(tmp_path / "gpu_check.json")
    gpu_report.main(["init", out, "--mode", "dry-run", "--plan", "kernels,model"])
    gpu_report.main(["stage", out, "--name", "kernels", "--rc", "0"])
    gpu_report.main(["stage", out, "--name", "model", "--skip", "interpreter", "--expected"])
    assert gpu_report.main(["finish", out]) == 0
    assert json.loads(open(out).read())["verdict"] == "pass"
