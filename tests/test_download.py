"""tools/download.py: offline in one line, archives unpacked once, and what it asks the Hub for (a
fake Hub)."""
import os
import subprocess
import sys
import tarfile
import zipfile

import pytest

from tools import download

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}])
def test_download_offline_fails_with_one_line(tmp_path, env):
    run_env = {**os.environ, "HF_HOME": str(tmp_path / "hf")}
    run_env.pop("HF_HUB_OFFLINE", None)
    run_env.update(env)
    proc = subprocess.run([sys.executable, "-m", "tools.download", "--out", str(tmp_path / "o"),
                           "--only", "meta_data"], capture_output=True, text=True, timeout=120,
                          env=run_env, cwd=REPO)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and download.HF_DATASET in lines[0]
    assert "cannot download from the Hugging Face Hub" in lines[0]


def test_unpack_extracts_once(tmp_path):
    out = tmp_path / "out"
    (tmp_path / "src" / "ShapeNet").mkdir(parents=True)
    (tmp_path / "src" / "ShapeNet" / "a.npy").write_text("x")
    os.makedirs(out)
    with tarfile.open(out / "ShapeNet.tar.gz", "w:gz") as t:
        t.add(tmp_path / "src" / "ShapeNet", arcname="ShapeNet")
    with zipfile.ZipFile(out / "meta_data.zip", "w") as z:
        z.writestr("meta_data/split/train_all.json", "[]")
    download.unpack(str(out), ["ShapeNet.tar.gz", "meta_data.zip"])
    assert (out / "ShapeNet" / "a.npy").read_text() == "x"
    assert (out / "meta_data" / "split" / "train_all.json").exists()
    (out / "ShapeNet" / "a.npy").unlink()
    # remembered: not extracted again
    download.unpack(str(out), ["ShapeNet.tar.gz", "meta_data.zip"])
    assert not (out / "ShapeNet" / "a.npy").exists()


def test_download_prints_estimate_fetches_parts_and_unpacks(tmp_path, monkeypatch, capsys):
    """The hub is replaced by a fake that serves a listing and one archive: checks what we ask it
    for."""
    from types import SimpleNamespace

    import huggingface_hub
    listing = [SimpleNamespace(rfilename="meta_data.zip", size=2_000_000_000),
               SimpleNamespace(rfilename="ShapeNet.tar.gz", size=9_000_000_000),
               SimpleNamespace(rfilename="Objaverse/000-000.tar.gz", size=1_000_000_000)]
    asked = {}

    class FakeApi:
        def dataset_info(self, repo_id, files_metadata=False, timeout=None):
            asked["info"] = (repo_id, files_metadata)
            return SimpleNamespace(siblings=listing)

    def fake_snapshot(repo_id, repo_type=None, local_dir=None, allow_patterns=None):
        asked["snapshot"] = (repo_id, repo_type, allow_patterns)
        with zipfile.ZipFile(os.path.join(local_dir, "meta_data.zip"), "w") as z:
            z.writestr("meta_data/split/lvis.json", "[]")
        return local_dir

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(download, "hub_reachable", lambda *a, **k: True)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    out = tmp_path / "dl"
    download.main(["--out", str(out), "--only", "meta_data", "--unpack"])
    assert asked["info"] == (download.HF_DATASET, True)
    assert asked["snapshot"] == (download.HF_DATASET, "dataset", ["meta_data.zip"])
    assert "1 files, 2.0 GB" in capsys.readouterr().out
    assert (out / "meta_data" / "split" / "lvis.json").exists()
