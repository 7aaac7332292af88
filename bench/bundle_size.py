"""Bundle size on disk against the weight bytes the memory plan computed for the build.

    python bench/bundle_size.py BUNDLE [BUNDLE ...]

One JSON line per bundle: every artifact's bytes, their sum, the manifest's planned_weight_bytes
(edge.plan via edge.quant.policy, written at build) and the ratio (target: within 10%).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edge.bundle import Bundle  # noqa: E402


def main(argv: list[str]) -> int:
    for p in argv:
        m = Bundle.open(p, verify=False).manifest
        total = sum(a.bytes for a in m.artifacts.values()) + (Path(p) / "manifest.json").stat().st_size
        planned = m.planned_weight_bytes
        print(json.dumps({"bench": "bundle_size", "bundle": str(p), "model": m.model.get("name"), "recipe": m.quant.recipe,
                          "group_size": m.quant.group_size, "artifacts": {k: a.bytes for k, a in m.artifacts.items()},
                          "bundle_bytes": total, "planned_weight_bytes": planned,
                          "ratio": round(total / planned, 4) if planned else None}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
