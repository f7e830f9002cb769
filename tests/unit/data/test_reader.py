"""The shard reader refuses what a tar may hold but a data set must not: links, absolute names, names
that climb out with `..`, samples without an image, files cut short, and manifests naming files
outside their folder; each in one sentence naming the shard and the member."""
from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest

from defect_ds.cli import main
from defect_ds.data.reader import iter_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "synthetic"
    assert main(["prepare", "synthetic", str(out), "--resolution-px", "32", "--per-defect", "3",
                 "--good-per-category", "4", "--categories", "pill", "--no-progress"]) == 0
    return out


def _rewrite(folder: Path, change) -> tuple[Path, str]:
    """The folder's first shard with its first image member changed by change(info, data) -> (info, data)
    or None (dropped); returns the shard and the name the member had."""
    shard = sorted(folder.glob("train-*.tar"))[0]
    with tarfile.open(shard) as tar:
        members = [(info, tar.extractfile(info).read()) for info in tar.getmembers()]
    first = next(i for i, (info, _) in enumerate(members) if info.name.endswith(".image.png"))
    name = members[first][0].name
    changed = change(*members[first])
    members[first:first + 1] = [changed] if changed else []
    with tarfile.open(shard, "w") as tar:
        for info, payload in members:
            tar.addfile(info, io.BytesIO(payload) if info.isreg() else None)
    return shard, name


def _renamed(prefix: str):
    def change(info, payload):
        info.name = prefix + info.name
        return info, payload
    return change


def _symlink(info, payload):
    link = tarfile.TarInfo(info.name)
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    return link, b""


@pytest.mark.parametrize("change, member, problem", [
    (_renamed("../"), "../{}", "a path out of the shard"),
    (_renamed("/"), "/{}", "an absolute path"),
    (_symlink, "{}", "a link"),
])
def test_a_member_that_is_not_a_plain_file_is_one_sentence_in_split_and_train_masks(data, tmp_path, capsys,
                                                                                    change, member, problem):
    bad = tmp_path / "data"
    shutil.copytree(data, bad)
    shard, name = _rewrite(bad, change)
    sentence = (f"Shard {shard} holds the member {member.format(name)!r}, which is {problem}; shards hold plain "
                "files named KEY.EXT, so re-run `defect-ds prepare` for that folder.")
    for command in (["downstream", "split", str(bad), str(tmp_path / "split")],
                    ["train-masks", str(bad), str(tmp_path / "mm"), "--resolution-px", "32", "--steps", "1"]):
        assert main(command) == 2
        assert capsys.readouterr().err.strip() == f"defect-ds {command[0]}: error: {sentence}"
    assert not (tmp_path / "split" / "split.json").exists() and not (tmp_path / "mm").exists()


def test_a_sample_without_its_image_and_a_shard_cut_short_are_named(data, tmp_path):
    bad = tmp_path / "no-image"
    shutil.copytree(data, bad)
    shard, name = _rewrite(bad, lambda info, payload: None)
    key = name[:-len(".image.png")]
    with pytest.raises(ValueError, match=rf"Sample '{key}' of shard {shard} has no image.png \(only "):
        list(iter_dataset(bad))

    cut = tmp_path / "cut"
    shutil.copytree(data, cut)
    shard = sorted(cut.glob("train-*.tar"))[0]
    whole = shard.read_bytes()
    shard.write_bytes(whole[:len(whole) // 2 + 100])  # inside a member
    with pytest.raises(ValueError, match=rf"Shard {shard} is truncated or not a tar file"):
        list(iter_dataset(cut))


@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", "sub/train-000000.tar", ".."])
def test_a_manifest_naming_a_shard_outside_its_folder_is_refused(data, tmp_path, capsys, name):
    from defect_ds.config import DataConfig
    from defect_ds.data.loader import plan_epoch

    bad = tmp_path / "data"
    shutil.copytree(data, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["shards"]["train"][0]["name"] = name
    (bad / "manifest.json").write_text(json.dumps(manifest))
    sentence = (f"{bad / 'manifest.json'} lists the shard {name!r}, which is not a file of that folder; a manifest "
                "names its shards by file name only, so re-run `defect-ds prepare` for that folder.")
    assert main(["downstream", "split", str(bad), str(tmp_path / "split")]) == 2
    assert capsys.readouterr().err.strip() == f"defect-ds downstream: error: {sentence}"
    with pytest.raises(ValueError) as e:  # the training loader reads the manifest through the same check
        plan_epoch(DataConfig(train_shards=str(bad), resolution_px=32), world_size=1)
    assert str(e.value) == sentence
