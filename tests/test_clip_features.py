"""Tests of clip_features.py on a tiny random-weight open_clip model (no CLIP weights can be
downloaded here).

    .venv/bin/python -m pytest -q tests/test_clip_features.py
"""
import json
import os
import re
import socket
import subprocess
import sys
import time

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from huggingface_hub import constants as hf_constants
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from files import BadInput  # noqa: E402
from tools import clip_features as cf  # noqa: E402

TINY = "tamm-test-tiny-clip"
# Small enough to build in well under a second; the real vocabulary so the stock tokenizer fits.
TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    cfg_path = tmp_path_factory.mktemp("cfg") / f"{TINY}.json"
    cfg_path.write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(cfg_path)
    torch.manual_seed(0)
    return cf.load_clip(TINY, pretrained=None)


def by_hand(texts, model, tokenizer, templates):
    """Reference: normalise each template's feature, average over templates, re-normalise."""
    rows = []
    with torch.no_grad():
        for text in texts:
            f = F.normalize(model.encode_text(tokenizer([t.format(text) for t in templates])),
                            dim=-1)
            rows.append(F.normalize(f.mean(0), dim=-1))
    return torch.stack(rows).numpy()


def test_encode_texts_shape_and_unit_norm(clip):
    model, tokenizer, _ = clip
    feats = cf.encode_texts(["a chair", "a red table", "lamp"], model, tokenizer, batch_size=2)
    assert feats.shape == (3, 32) and feats.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)
    with torch.no_grad():
        direct = F.normalize(model.encode_text(tokenizer(["a red table"])), dim=-1).numpy()
    np.testing.assert_allclose(feats[1:2], direct, atol=1e-5)


def test_class_names_are_the_template_average(clip):
    model, tokenizer, _ = clip
    assert len(cf.PROMPT_TEMPLATES) >= 55 and all(t.count("{}") == 1 for t in cf.PROMPT_TEMPLATES)
    names = ["chair", "flower pot"]
    feats = cf.encode_class_names(names, model, tokenizer)
    assert feats.shape == (2, 32) and feats.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(feats, by_hand(names, model, tokenizer, cf.PROMPT_TEMPLATES),
                               atol=1e-5)
    few = ["a {} in 3D.", "{}"]
    np.testing.assert_allclose(cf.encode_class_names(names, model, tokenizer, templates=few),
                               by_hand(names, model, tokenizer, few), atol=1e-5)
    # The ensemble is not the feature of the bare name.
    assert not np.allclose(feats, cf.encode_texts(names, model, tokenizer), atol=1e-3)


@pytest.mark.parametrize("names", [[], ["chair", ""], ["chair", "  "], ["mug", "mug"]])
def test_bad_class_names(clip, names):
    model, tokenizer, _ = clip
    with pytest.raises(BadInput):
        cf.encode_class_names(names, model, tokenizer)


def test_bad_templates(clip):
    model, tokenizer, _ = clip
    with pytest.raises(BadInput, match="templates"):
        cf.encode_class_names(["chair"], model, tokenizer, templates=["no slot here"])


def test_class_feature_round_trip_both_layouts(tmp_path):
    names = ["zebra", "apple", "mug"]  # not sorted: the order must survive as given
    feats = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32)
    cf.write_class_features(names, feats, tmp_path / "mn.npy", layout="modelnet")
    raw = np.load(tmp_path / "mn.npy", allow_pickle=True).item()
    assert list(raw) == names and raw["apple"]["open_clip_text_feat"].shape == (1, 8)
    got_names, got = cf.read_class_features(tmp_path / "mn.npy")
    assert got_names == names and got.dtype == np.float32
    np.testing.assert_array_equal(got, feats)

    cf.write_class_features(names, feats, tmp_path / "lvis.npy", layout="lvis")
    raw = np.load(tmp_path / "lvis.npy")
    assert raw.dtype == np.float32 and raw.shape == (3, 8)
    got_names, got = cf.read_class_features(tmp_path / "lvis.npy")
    assert got_names is None
    np.testing.assert_array_equal(got, feats)

    with pytest.raises(BadInput, match="layout"):
        cf.write_class_features(names, feats, tmp_path / "x.npy", layout="shapenet")
    with pytest.raises(BadInput, match="one feature row per class"):
        cf.write_class_features(names[:2], feats, tmp_path / "x.npy")


def test_read_class_features_bad_files(tmp_path):
    with pytest.raises(BadInput, match="not found"):
        cf.read_class_features(tmp_path / "missing.npy")
    (tmp_path / "junk.npy").write_bytes(b"definitely not numpy")
    with pytest.raises(BadInput, match="junk.npy"):
        cf.read_class_features(tmp_path / "junk.npy")
    np.save(tmp_path / "wrongdict.npy", {"chair": {"feat": np.zeros((1, 4))}}, allow_pickle=True)
    with pytest.raises(BadInput, match="open_clip_text_feat"):
        cf.read_class_features(tmp_path / "wrongdict.npy")
    np.save(tmp_path / "trunc.npy", np.zeros((100, 4), np.float32))
    (tmp_path / "trunc.npy").write_bytes((tmp_path / "trunc.npy").read_bytes()[:900])
    with pytest.raises(BadInput, match="trunc.npy"):
        cf.read_class_features(tmp_path / "trunc.npy")


def write_image(path, color, mode="RGB"):
    Image.new(mode, (40, 30), color).save(path)


@pytest.fixture
def shape_folder(tmp_path):
    rng = np.random.default_rng(0)
    images = tmp_path / "renders"
    s1, s2 = images / "s1", images / "s2"
    s1.mkdir(parents=True)
    s2.mkdir()
    write_image(s1 / "view_00.png", (200, 30, 30))
    write_image(s1 / "view_01.png", (30, 200, 30, 0), mode="RGBA")  # fully transparent: white
    write_image(s1 / "view_02.jpg", (30, 30, 200))
    pts6 = np.concatenate([rng.normal(size=(50, 3)), rng.uniform(size=(50, 3))], axis=1)
    np.save(s1 / "points.npy", pts6)
    (s1 / "captions.txt").write_text("a red chair\n\nan old wooden chair\n")
    write_image(s2 / "a.jpeg", (10, 10, 10))
    write_image(s2 / "b.png", (250, 250, 0))
    write_image(s2 / "thumbnail.png", (0, 0, 0))
    np.save(s2 / "points.npy", rng.normal(size=(40, 3)).astype(np.float32))
    (images / "notes.txt").write_text("top-level files are ignored")
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps({"s1": ["a chair"], "s2": "a lamp"}))
    return images, captions, pts6


def test_encode_shape_folder_release_format(clip, shape_folder, tmp_path):
    model, tokenizer, preprocess = clip
    images, captions, pts6 = shape_folder
    out = tmp_path / "out"
    written = cf.encode_shape_folder(images, out, model, tokenizer, preprocess, captions=captions,
                                     dataset="mine")
    assert [os.path.basename(p) for p in written] == ["s1.npy", "s2.npy"]
    s1 = np.load(out / "s1.npy", allow_pickle=True).item()
    s2 = np.load(out / "s2.npy", allow_pickle=True).item()
    for shape, sid in ((s1, "s1"), (s2, "s2")):
        assert shape["dataset"] == "mine" and shape["group"] == "renders" and shape["id"] == sid
        assert shape["blip_caption"] == "" and shape["msft_caption"] == ""
        for key in ("blip_caption_feat", "msft_caption_feat"):
            assert (set(shape[key]) == {"original", "prompt_avg"}
                    and shape[key]["original"].shape == (1, 32))
        assert shape["retrieval_text"] == [] and shape["retrieval_text_feat"] == []
        assert len(shape["text_feat"]) == len(shape["text"])
        for feat in shape["text_feat"]:
            assert set(feat) == {"original", "prompt_avg"}
            for v in feat.values():
                assert v.shape == (1, 32) and v.dtype == np.float32
                np.testing.assert_allclose(np.linalg.norm(v), 1.0, atol=1e-5)
        assert shape["xyz"].dtype == np.float32 and shape["rgb"].dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(shape["image_feat"], axis=1), 1.0, atol=1e-5)

    # JSON first, then captions.txt
    assert s1["text"] == ["a chair", "a red chair", "an old wooden chair"]
    assert s1["image_feat"].shape == (3, 32) and "thumbnail_feat" not in s1
    np.testing.assert_allclose(s1["xyz"], pts6[:, :3], rtol=1e-6)
    np.testing.assert_allclose(s1["rgb"], pts6[:, 3:], rtol=1e-6)
    np.testing.assert_allclose(np.concatenate([f["original"] for f in s1["text_feat"]]),
                               cf.encode_texts(s1["text"], model, tokenizer), atol=1e-5)
    np.testing.assert_allclose(np.concatenate([f["prompt_avg"] for f in s1["text_feat"]]),
                               by_hand(s1["text"], model, tokenizer, cf.PROMPT_TEMPLATES),
                               atol=1e-5)
    # View 1 is fully transparent, so CLIP must have seen a white image.
    with torch.no_grad():
        white = preprocess(Image.new("RGB", (40, 30), (255, 255, 255)))[None]
        expected = F.normalize(model.encode_image(white), dim=-1).numpy()
    np.testing.assert_allclose(s1["image_feat"][1:2], expected, atol=1e-5)

    assert s2["text"] == ["a lamp"]
    assert s2["image_feat"].shape == (2, 32) and s2["thumbnail_feat"].shape == (32,)
    assert s2["xyz"].shape == (40, 3) and np.all(s2["rgb"] == np.float32(0.4))

    split = json.loads((out / "split.json").read_text())
    assert split == [{"id": s, "data_path": str(out / f"{s}.npy"), "dataset": "mine",
                      "group": "renders"}
                     for s in ("s1", "s2")]


def test_shape_folder_bad_input(clip, shape_folder, tmp_path):
    model, tokenizer, preprocess = clip
    images, _, _ = shape_folder
    os.remove(images / "s2" / "points.npy")
    with pytest.raises(BadInput, match=r"s2: no points\.npy"):
        cf.encode_shape_folder(images, tmp_path / "out", model, tokenizer, preprocess)
    assert not (tmp_path / "out").exists()  # checked before anything is written
    np.save(images / "s2" / "points.npy", np.full((10, 6), 255.0))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(BadInput, match="bad.json"):
        cf.main(["--pretrained", "none", "--model", TINY, "shapes", "--images", str(images),
                 "--captions", str(tmp_path / "bad.json"), "--out", str(tmp_path / "out")])
    # one rgb convention with evaluate.py --pc (tools/pointclouds.py): 0-255 colours are divided
    # by 255 ...
    cf.encode_shape_folder(images, tmp_path / "ok", model, tokenizer, preprocess)
    assert np.all(np.load(tmp_path / "ok" / "s2.npy", allow_pickle=True).item()["rgb"] == 1.0)
    # ... and anything else is refused
    np.save(images / "s2" / "points.npy", np.full((10, 6), 300.0))
    with pytest.raises(BadInput, match=r"rgb must lie in \[0, 1\] or \[0, 255\]"):
        cf.encode_shape_folder(images, tmp_path / "out", model, tokenizer, preprocess)
    for name in os.listdir(images / "s2"):
        if name != "points.npy":
            os.remove(images / "s2" / name)
    with pytest.raises(BadInput, match="s2: no rendered views"):
        cf.encode_shape_folder(images, tmp_path / "out", model, tokenizer, preprocess)
    with pytest.raises(BadInput, match="images folder not found"):
        cf.encode_shape_folder(tmp_path / "nope", tmp_path / "out", model, tokenizer, preprocess)


def test_load_clip_weights_file_and_errors(clip, tmp_path):
    model, tokenizer, _ = clip
    weights = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), weights)
    loaded, _, _ = cf.load_clip(TINY, pretrained=str(weights))
    text = ["a small lamp"]
    np.testing.assert_allclose(cf.encode_texts(text, loaded, tokenizer),
                               cf.encode_texts(text, model, tokenizer), atol=1e-6)
    assert not loaded.training

    missing = tmp_path / "nowhere" / "open_clip_model.safetensors"
    with pytest.raises(BadInput, match=re.escape(f"{missing}: no such weights file")):
        cf.load_clip(TINY, pretrained=str(missing))
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(BadInput, match="junk.pt: cannot load"):
        cf.load_clip(TINY, pretrained=str(tmp_path / "junk.pt"))
    torch.save({"visual.proj": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(BadInput, match="other.pt: cannot load"):
        cf.load_clip(TINY, pretrained=str(tmp_path / "other.pt"))
    with pytest.raises(BadInput, match="not an open_clip model"):
        cf.load_clip("ViT-Nonexistent-1", pretrained=None)


def test_tag_is_taken_from_the_hugging_face_cache(tmp_path, monkeypatch):
    # The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<commit>/<file>}.
    repo = tmp_path / "models--laion--CLIP-ViT-bigG-14-laion2B-39B-b160k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "open_clip_pytorch_model.bin").write_bytes(b"weights")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    tag = cf.DEFAULT_PRETRAINED
    cfg = open_clip.get_pretrained_cfg(cf.DEFAULT_MODEL, tag)
    assert (cf._tag_weights(cf.DEFAULT_MODEL, tag, cfg)
            == str(snapshot / "open_clip_pytorch_model.bin"))
    # preferred, as open_clip does
    (snapshot / "open_clip_model.safetensors").write_bytes(b"weights")
    assert (cf._tag_weights(cf.DEFAULT_MODEL, tag, cfg)
            == str(snapshot / "open_clip_model.safetensors"))


def test_main_classes_and_shapes(clip, shape_folder, tmp_path, capsys):
    model, tokenizer, _ = clip
    out = tmp_path / "cat_name_pt_feat.npy"
    cf.main(["--model", TINY, "--pretrained", "none", "--device", "cpu", "classes",
             "--names", "sofa, bed,lamp", "--out", str(out)])
    names, feats = cf.read_class_features(out)
    assert names == ["sofa", "bed", "lamp"] and feats.shape == (3, 32)
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)

    names_file = tmp_path / "names.txt"
    names_file.write_text("bed\nsofa\n\n")
    cf.main(["--model", TINY, "--pretrained", "none", "classes", "--names-file", str(names_file),
             "--layout", "lvis", "--out", str(tmp_path / "lvis.npy")])
    assert np.load(tmp_path / "lvis.npy").shape == (2, 32)
    with pytest.raises(BadInput, match="appear more than once: a"):
        cf.main(["--model", TINY, "--pretrained", "none", "classes", "--names", "a,b,a",
                 "--out", str(out)])
    with pytest.raises(BadInput, match="--names '  , ': no labels given"):
        cf.main(["--model", TINY, "--pretrained", "none", "classes", "--names", "  , ",
                 "--out", str(out)])

    images, captions, _ = shape_folder
    cf.main(["--model", TINY, "--pretrained", "none", "shapes", "--images", str(images),
             "--captions", str(captions), "--out", str(tmp_path / "shapes")])
    assert sorted(os.listdir(tmp_path / "shapes")) == ["s1.npy", "s2.npy", "split.json"]
    assert "wrote 2 shapes" in capsys.readouterr().out


def run_cli_offline(tmp_path, **env):
    """Run the default-weights CLI in a subprocess with an empty HF cache; (rc, stderr lines,
    seconds)."""
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("HF_HUB_OFFLINE", "HF_ENDPOINT", "HF_HUB_CACHE")}
    full_env.update(HF_HOME=str(tmp_path / "hf_home"), **env)
    start = time.time()
    full_env["PYTHONPATH"] = ROOT
    proc = subprocess.run([sys.executable, "-m", "tools.clip_features", "classes", "--names", "a,b",
                           "--out", str(tmp_path / "X.npy")], env=full_env, capture_output=True,
                          text=True, timeout=60, cwd=tmp_path)
    return proc.returncode, proc.stderr.strip().splitlines(), time.time() - start


def test_cli_default_weights_offline_fails_fast(tmp_path):
    rc, err, seconds = run_cli_offline(tmp_path, HF_HUB_OFFLINE="1")
    assert rc == 2 and len(err) == 1, err
    assert (err[0].startswith("error: --pretrained laion2b_s39b_b160k:")
            and "HF_HUB_OFFLINE" in err[0])
    assert "--pretrained PATH" in err[0] and "HF_HOME" in err[0]
    assert seconds < 30  # mostly the import of torch and open_clip
    assert not (tmp_path / "X.npy").exists()


def test_cli_default_weights_unreachable_hub_fails_fast(tmp_path):
    with socket.socket() as s:  # a local port nobody listens on: the connection is refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rc, err, seconds = run_cli_offline(tmp_path, HF_ENDPOINT=f"http://127.0.0.1:{port}")
    assert rc == 2 and len(err) == 1, err
    assert "cannot reach" in err[0] and "HF_HOME" in err[0]
    assert seconds < 30  # the hub client alone would retry for about 50 s
