"""A smoke run of benchmarks/bench_loader.py: tiny shards, one timed epoch, results in a temporary file."""
from __future__ import annotations

import torch



def test_bench_loader_writes_a_results_table(tmp_path, capsys, load_script):
    bench = load_script("benchmarks/bench_loader.py")
    out = tmp_path / "loader.md"
    threads = torch.get_num_threads()
    try:
        bench.main(["--source-px", "32", "--resolution-px", "16", "--samples", "12", "--batch", "2",
                    "--epochs", "1", "--workers", "0", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)  # the script pins one thread, as a DataLoader worker has
    text = out.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| 0 (main process) |"))
    assert float(row.split("|")[2]) > 0  # a measured rate, not a placeholder
    assert "12 samples of 32x32 px" in text and '"resolution_px": 16' in text
    assert f"wrote {out}" in capsys.readouterr().out
