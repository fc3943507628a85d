"""Shared by the benchmark scripts: the combined five-number table and the README record block."""

from __future__ import annotations

import re
from pathlib import Path

from offsite.report import SETTINGS, summary_rows

ROOT = Path(__file__).resolve().parents[1]


def five_number_table(sections: list[tuple[str, dict]], tasks: list[str], label: str = "emulator") -> str:
    """Rows `| name | task | settings... | gap |` for each (name, results.json data) section."""
    present = [s for s in SETTINGS if any(s in r for _, d in sections for r in summary_rows(d))]
    lines = [
        f"| {label} | task | " + " | ".join(s.replace("_", " ") for s in present) + " | plug-in − emu FT |",
        "|---" * (len(present) + 3) + "|",
    ]
    for name, data in sections:
        rows = [r for r in summary_rows(_only(data, tasks))]
        for row in rows:
            cells = [f"{row[s][0]:.1f} / {row[s][1]:.1f}" if s in row else "–" for s in present]
            gap = f"{row['gap'][0]:+.1f} / {row['gap'][1]:+.1f}" if "gap" in row else "–"
            lines.append(f"| {name} | {row['task']} | " + " | ".join(cells) + f" | {gap} |")
    return "\n".join(lines)


def _only(data: dict, tasks: list[str]) -> dict:
    """The results restricted to `tasks` (a cache may hold more), so the mean is over these."""
    return data | {"tasks": {t: v for t, v in data["tasks"].items() if t in tasks or t.startswith("_")}}


def update_readme(marker: str, text: str) -> None:
    """Replace what lies between `<!-- marker:start -->` and `<!-- marker:end -->` in README.md."""
    readme = ROOT / "README.md"
    content = readme.read_text()
    pattern = re.compile(rf"(<!-- {re.escape(marker)}:start -->\n).*?(<!-- {re.escape(marker)}:end -->)", re.S)
    if not pattern.search(content):
        raise SystemExit(f"README.md has no <!-- {marker}:start/end --> markers")
    readme.write_text(pattern.sub(lambda m: m.group(1) + text + "\n" + m.group(2), content))
    print(f"updated {readme}")
