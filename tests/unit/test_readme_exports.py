"""The README's Exports snippets, run as written, each in a fresh Python process, against the shipped
base (models/tiny-defect-base) and an export the trainer's own Exporter wrote on it: a plain
`from_pretrained` of what we ship must generate without extra arguments."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "models" / "tiny-defect-base"
TOKENS = {"crack": "sks_crack", "scratch": "sks_scratch", "spot": "sks_spot"}


def readme_section_snippets(section: str) -> list[str]:
    """The ```python blocks of one `## section` of README.md, in order."""
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"^## {re.escape(section)}\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    assert match, f"README.md has no '## {section}' section"
    return re.findall(r"^```python\n(.*?)^```", match.group(1), flags=re.S | re.M)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder laid out as a clone after `make demo`: models/tiny-defect-base and runs/default/export."""
    from defect_ds.config import load_config
    from defect_ds.model import textual_inversion
    from defect_ds.model.components import add_lora, load_components, set_trainable
    from defect_ds.train.export import Exporter

    work = tmp_path_factory.mktemp("clone")
    (work / "models").mkdir()
    (work / "models" / "tiny-defect-base").symlink_to(BASE, target_is_directory=True)
    cfg = load_config(ROOT / "configs" / "default.toml", [f"--model.pretrained_dir={BASE}"])
    torch.manual_seed(0)
    parts = load_components(cfg.model)
    add_lora(parts.unet, cfg.lora)
    textual_inversion.add_tokens(parts.tokenizer, parts.text_encoder, list(TOKENS.values()),
                                 cfg.textual_inversion.vectors_per_token, cfg.textual_inversion.initializer_word)
    set_trainable(parts.unet, parts.text_encoder, cfg.model.unet_mode)
    with torch.no_grad():  # "trained": adapters that change the output, tokens of their own
        for name, p in parts.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
        parts.text_encoder.get_input_embeddings().learned_vectors.normal_(0, 0.5)
    exporter = Exporter(cfg.model, cfg.lora, cfg.textual_inversion, resolution_px=cfg.data.resolution_px,
                        defect_tokens=TOKENS, zero_stage=0, is_main=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.distributed, "barrier", lambda *a, **k: None)  # one process, no group
        exporter.write(parts, work / "runs" / "default" / "export", step=600)
    return work


def test_the_readme_shows_both_ways_to_load_an_export():
    snippets = readme_section_snippets("Exports")
    assert len(snippets) == 2
    for code in snippets:
        # the plain load users copy: no torch_dtype or other argument that would hide a dtype mismatch
        assert 'StableDiffusionPipeline.from_pretrained("models/tiny-defect-base")\n' in code


@pytest.mark.parametrize("index", [0, 1], ids=["stock-diffusers", "mask-gated"])
def test_readme_export_snippet_runs_as_written(workdir, index):
    code = readme_section_snippets("Exports")[index]
    code, changed = re.subn(r"num_inference_steps=\d+", "num_inference_steps=2", code)  # the one change: speed
    assert changed == 1
    saved = re.findall(r'image\.save\("([^"]+)"\)', code)
    assert len(saved) == 1, "each Exports snippet ends by saving its image"
    (workdir / saved[0]).unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", code], cwd=workdir, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    image = np.asarray(Image.open(workdir / saved[0]))
    assert image.shape == (64, 64, 3) and image.std() > 0  # the base's size, not a blank
