"""The wheel carries what a non-editable install needs at run time: the Hydra config tree, the
shipped corpus, the C++ source of the CPU reduction and the launcher plugin."""

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_wheel_ships_the_config_corpus_and_cpp_source(tmp_path):
    """Built from a copy of the checkout's files (a build/ folder left in the repo would hide a file
    missing from the package data)."""
    import shutil

    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    src = tmp_path / "src"
    for f in files:
        if (REPO / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, src / f)
    out = tmp_path / "wheel"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q", "-w", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    [wheel] = out.glob("outlier_hydra-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "outlier_hydra/collect/fused_cpu.cpp" in names
    assert "outlier_hydra/conf/config.yaml" in names
    assert {f"outlier_hydra/conf/{p.relative_to(REPO / 'conf')}" for p in (REPO / "conf").rglob("*.yaml")} <= names
    assert any(n.startswith("outlier_hydra/data/corpus/") and n.endswith(".txt") for n in names)
    assert "hydra_plugins/outlier_hydra_launcher/__init__.py" in names
