"""benchmarks/gpu_report.py: the verdict file gpu_check.sh rewrites after every stage (CI runs the dry run)."""

from __future__ import annotations

import json

from benchmarks import gpu_report


def _report(path):
    with open(path) as f:
        return json.load(f)


def _stage(out, name, *extra):
    assert gpu_report.main(["stage", str(out), "--name", name, *extra]) == 0
    return _report(out)


def test_every_stage_leaves_a_complete_file_and_a_killed_stage_fails(tmp_path, capsys):
    out = tmp_path / "gpu_check.json"
    env = tmp_path / "env.json"
    env.write_text(json.dumps({"device": "NVIDIA H100", "torch": "2.11.0", "triton": "3.6.0"}))
    assert gpu_report.main(["init", str(out), "--mode", "gpu", "--plan", "kernels,model,train", "--env", str(env)]) == 0
    report = _report(out)
    assert (report["verdict"], report["device"], report["triton"], report["stages"]) == (
        "incomplete", "NVIDIA H100", "3.6.0", [])

    numbers = tmp_path / "kernels.json"
    numbers.write_text(json.dumps({"records": [{"check": "attention", "ok": True}], "failed": []}))
    report = _stage(out, "kernels", "--rc", "0", "--seconds", "41.26", "--budget", "120", "--numbers", str(numbers))
    kernels = report["stages"][0]
    assert (kernels["status"], kernels["seconds"], kernels["records"][0]["check"]) == ("pass", 41.3, "attention")
    assert report["verdict"] == "incomplete"  # not every planned stage has run yet

    half = tmp_path / "model.json"
    half.write_text('{"records": [')  # what a kill mid-write leaves
    report = _stage(out, "model", "--rc", "124", "--seconds", "60", "--budget", "60", "--numbers", str(half))
    model = report["stages"][1]
    assert model["status"] == "fail" and "killed at its budget of 60 s" in model["reason"]
    assert "could not read model.json" in model["notes"][0]
    assert report["verdict"] == "fail"  # known as soon as a stage fails

    _stage(out, "train", "--skip", "the check's 400 s deadline left no time")
    assert gpu_report.main(["finish", str(out)]) == 1
    assert _report(out)["verdict"] == "fail"
    assert "verdict: fail" in capsys.readouterr().out


def test_only_expected_skips_pass(tmp_path):
    out = tmp_path / "gpu_check.json"
    gpu_report.main(["init", str(out), "--mode", "dry-run", "--plan", "kernels,train"])
    _stage(out, "kernels", "--rc", "0")
    _stage(out, "train", "--skip", "no compiler on a CPU", "--expected")
    assert gpu_report.main(["finish", str(out)]) == 0
    _stage(out, "train", "--skip", "ran out of time")  # the same stage again replaces its record
    assert [s["name"] for s in _report(out)["stages"]] == ["kernels", "train"]
    assert gpu_report.main(["finish", str(out)]) == 1
    gpu_report.main(["init", str(out), "--mode", "gpu", "--plan", "kernels,train"])
    _stage(out, "kernels", "--rc", "0")
    assert gpu_report.main(["finish", str(out)]) == 1  # a planned stage never reported: not a pass
    assert _report(out)["verdict"] == "incomplete"
