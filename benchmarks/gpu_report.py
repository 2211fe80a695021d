"""The report of benchmarks/gpu_check.sh: one Markdown file and one JSON from its work folder.

    python benchmarks/gpu_report.py WORK_DIR OUT_DIR

WORK_DIR holds steps.tsv (name, seconds allowed, exit code or "skipped", seconds taken, command), one NAME.log per
step, and the JSON that `corrclip bench` (bench_*.json) and the harness (gpu_check.json) wrote. OUT_DIR receives
gpu_check.md (for benchmarks/RESULTS.md) and gpu_check.json (everything, logs cut to their last lines).
"""

from __future__ import annotations

import datetime
import json
import platform
import sys
from pathlib import Path

TAIL = 120  # log lines kept per step


def status(code: str) -> str:
    return {"0": "ok", "124": "timed out", "137": "killed (timeout)", "skipped": "skipped (budget spent)",
            "nogpu": "skipped (no usable GPU)"}.get(
        code, f"failed (exit {code})")


def read_steps(work: Path) -> list[dict]:
    steps = []
    for line in (work / "steps.tsv").read_text().splitlines():
        name, limit, code, seconds, command = line.split("\t", 4)
        log = work / f"{name}.log"
        lines = log.read_text(errors="replace").splitlines() if log.exists() else []
        steps.append({"name": name, "status": status(code), "exit_code": code, "seconds": int(seconds),
                      "limit_s": int(limit), "command": command, "log_tail": lines[-TAIL:]})
    return steps


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def markdown(report: dict) -> str:
    env = next((s for s in report["steps"] if s["name"] == "environment"), None)
    lines = [f"## Device check, {report['date']}", ""]
    if env:
        lines += ["```", *env["log_tail"], "```", ""]
    lines += ["| step | status | seconds |", "|---|---|---|"]
    lines += [f"| {s['name']} | {s['status']} | {s['seconds']} |" for s in report["steps"]]
    for s in report["steps"]:
        if s["name"] == "environment" or s["status"].startswith("skipped"):
            continue
        lines += ["", f"### {s['name']}: {s['status']}", "", f"`{s['command']}`", "", "```", *s["log_tail"], "```"]
    if report["harness_markdown"]:
        lines += ["", "### harness table", "", report["harness_markdown"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    work, out = Path(argv[0]), Path(argv[1])
    out.mkdir(parents=True, exist_ok=True)
    harness_md = work / "gpu_check.md"
    report = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "host": platform.node(),
        "steps": read_steps(work),
        "bench": {p.stem: read_json(p) for p in sorted(work.glob("bench_*.json"))},
        "harness": read_json(work / "gpu_check.json"),
        "harness_markdown": harness_md.read_text() if harness_md.exists() else "",
    }
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    (out / "gpu_check.md").write_text(markdown(report))
    failed = [s["name"] for s in report["steps"] if s["status"] != "ok"]
    print(f"wrote {out / 'gpu_check.md'} and {out / 'gpu_check.json'}; "
          + (f"not ok: {', '.join(failed)}" if failed else "every step ok"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
