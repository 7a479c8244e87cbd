"""benchmarks/peers.py (`make bench-peers`) without running Flower: the document block, the round
arithmetic, the process-tree memory and clean-up; the Flower apps only where .venv-peers exists
(nothing is installed here)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from benchmarks.peers import APP_DIR, TreeMemory, stop_descendants, summarize
from benchmarks.run import PEERS_BEGIN, PEERS_END, peers_block, with_block, write_doc
from fedgradnorm.federation import load_federation

ROOT = Path(__file__).resolve().parents[1]
BLOCK = f"{PEERS_BEGIN}\n## Side by side with Flower\n\nnumbers\n{PEERS_END}"
DOC = "# Benchmarks\n\nintro\n\n## Headline\n\n- a\n\n## Round overhead\n\ntable\n"


def test_block_goes_after_the_headline_and_is_kept(tmp_path: Path) -> None:
    text = with_block(DOC, BLOCK)
    assert text.index("## Headline") < text.index(PEERS_BEGIN) < text.index(PEERS_END) < text.index("## Round")
    again = with_block(text, BLOCK.replace("numbers", "new numbers"))
    assert again.count(PEERS_BEGIN) == 1 and "new numbers" in again and "\nnumbers" not in again
    assert with_block("", BLOCK) == BLOCK + "\n"
    doc = tmp_path / "b.md"
    doc.write_text(text)
    write_doc(doc, DOC.replace("table", "new table"))  # `make bench` rewrites the rest, keeps the block
    assert peers_block(doc.read_text()) == BLOCK and "new table" in doc.read_text()
    write_doc(tmp_path / "fresh.md", DOC)
    assert peers_block((tmp_path / "fresh.md").read_text()) is None


def test_rounds_are_close_to_close_after_the_warmup() -> None:
    closes = [10.0, 11.0, 13.0, 16.0, 20.0]
    at = [100, 200, 400, 600, 800]
    r = summarize(closes, at, warmup=1, rounds=3)
    assert r["times"] == [1.0, 2.0, 3.0] and r["round"] == 2.0 and r["bytes"] == (600 - 100) / 3
    r = summarize(closes, at, warmup=2, rounds=3)
    assert r["times"] == [2.0, 3.0, 4.0] and r["bytes"] == 200
    with pytest.raises(RuntimeError):
        summarize(closes[:3], at[:3], warmup=1, rounds=3)


def test_tree_memory_sums_a_tree_and_its_leftovers_are_stopped() -> None:
    mem = TreeMemory()
    parent = subprocess.Popen(["sh", "-c", "sleep 60 & sleep 60 & wait"])
    try:
        for _ in range(100):
            rss, procs = mem.of(parent.pid)
            if procs == 3:
                break
            time.sleep(0.05)
        assert procs == 3 and rss > 0
        found = mem.descendants(parent.pid)
        assert len(found) == 2
        assert stop_descendants(found, grace=5) == 2
        assert parent.wait(10) == 0  # its children gone, `wait` returns
        assert stop_descendants(found, grace=1) == 0
    finally:
        parent.kill()
        parent.wait()


def test_flower_app_matches_network2() -> None:
    python = ROOT / ".venv-peers" / "bin" / "python"
    if not python.exists():
        pytest.skip("no .venv-peers (make bench-peers creates it)")
    code = (
        "import json, tomllib\n"
        "from flwr.common.config import validate_config\n"
        "from peers_app import client_app, server_app\n"
        "from peers_app.task import Network2\n"
        "ok, errors, _ = validate_config(tomllib.load(open('pyproject.toml', 'rb')), project_dir='.')\n"
        "assert ok, errors\n"
        "print(json.dumps({k: list(v.shape) for k, v in Network2().state_dict().items()}))\n"
    )
    out = subprocess.run([str(python), "-c", code], cwd=APP_DIR, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    shared = load_federation("radcom").build_shared(0)
    assert json.loads(out.stdout.splitlines()[-1]) == {k: list(v.shape) for k, v in shared.state_dict().items()}
